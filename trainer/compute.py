"""The one thread that runs the trainer's torch work, off the event loop.

With torch's OpenMP backend, every thread that runs parallel ops gets its own team of worker threads, and two
teams on a small machine contend: an SFT step of the tiny demo run in a worker thread after the main thread
had run torch ops took 1.4-1.7 s, against 0.96 s when only one thread ever ran torch (2 cores). So model
loading, the SFT and RL updates and the predictor's features all run here, one call at a time, and the event
loop keeps serving rollouts meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-torch")


async def compute(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run fn(*args, **kwargs) on the torch thread and await its result."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(fn, *args, **kwargs))

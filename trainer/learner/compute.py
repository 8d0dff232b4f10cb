"""The trainer's two torch threads, off the event loop: `compute` (the policy) and `infer` (what rollouts need).

- `compute`, thread "trace-torch": model loading, the SFT and RL updates, the predictor's fit, weight saves and
  checkpoints, one call at a time. With torch's OpenMP backend, every thread that runs parallel ops gets its own
  team of worker threads, and two teams on a small machine contend: an SFT step of the tiny demo run in a worker
  thread after the main thread had run torch ops took 1.4-1.7 s, against 0.96 s when only one thread ever ran
  torch (2 cores). So all of the policy's work stays on this one thread.
- `infer`, thread "trace-infer": what a step's collection needs from torch while the previous step trains
  (DESIGN §3: "nothing generation needs may queue behind the optimizer") — prefix features on a frozen copy
  of the policy's model (`trainer.learner.policy.FeatureModel`) and V(H) from a snapshot of the predictor taken after
  each fit (`trainer.algo.step.TraceStep.publish`). It is used only when `run.max_staleness >= 1`; with 0 nothing
  overlaps, collection's torch work runs on `compute` on the policy itself, and the copy is never made.

Why two threads are safe: they never touch the same tensors. The update and the saves own the policy's model
and the live predictor; `infer` owns the copy and the snapshot, and the only moment it reads the policy is the
copy's refresh (`FeatureModel.sync`), under the policy's lock, which every update and save also hold. Python
objects shared between them are swapped whole (one attribute assignment), never mutated in place. Torch releases
the GIL inside its kernels, so the two run in parallel; on a small CPU they share the cores (each thread's
intra-op team is the size torch.get_num_threads() reports there), which is the price of the overlap. On a GPU
the copy runs on a CUDA stream of its own, so its kernels do not queue behind the optimizer's.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-torch")
_INFER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-infer")


async def compute(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run fn(*args, **kwargs) on the torch thread and await its result."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(fn, *args, **kwargs))


async def infer(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run fn(*args, **kwargs) on the inference thread and await its result (never behind `compute`'s work)."""
    return await asyncio.get_running_loop().run_in_executor(_INFER, functools.partial(fn, *args, **kwargs))

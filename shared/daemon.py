"""Blocking work on a daemon thread of its own, awaited from the event loop.

For torch collectives (the weight-update group's rendezvous, broadcasts, receives): one may block until the group's
timeout (minutes), so it must not hold a default-executor thread the loop's or the interpreter's exit would wait
for. Cancelling the await leaves the thread to finish on its own; its result is then dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def start_daemon(fn: Callable[[], T], name: str) -> tuple[asyncio.Future[T], threading.Thread]:
    """Start fn() on a new daemon thread; its result (or exception) arrives in the returned future, on the running
    loop. The thread is returned too, for callers that must know when it has ended."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def run() -> None:
        try:
            result: tuple[bool, Any] = (True, fn())
        except BaseException as e:
            result = (False, e)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(deliver, *result)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return fut, thread

"""Retrying one async call on transient failures: the single retry loop of every TRACE HTTP client.

    policy = RetryPolicy(attempts=4, backoff_s=0.2, errors=(aiohttp.ClientConnectorError,), statuses=SERVER_ERRORS)

    async def once() -> bytes:
        async with session.get(url) as resp:
            body = await resp.read()
        if resp.status >= 500:
            raise StatusError(resp.status, body[:200].decode(errors="replace"))
        return body

    body = await with_retries(policy, once, event="thing_retry", url=url)

Contract
- `once` (a coroutine function, no arguments) is awaited at most `policy.attempts` times, one attempt at a
  time. It returns the result, or raises. Its error is *transient* when it is an instance of one of
  `policy.errors`, or a `StatusError` whose status is in `policy.statuses`; only transient errors are retried.
  Only `Exception`s can be transient: a CancelledError, KeyboardInterrupt or SystemExit always propagates.
  An attempt that wants an answer's status retried raises `StatusError` for it (the helper knows no HTTP).
- Any other error propagates at once, unchanged, with no further attempt.
- After a transient failure of attempt n (1-based) that is not the last, it waits
  `min(max_backoff_s, backoff_s * 2 ** (n - 1))`, multiplied by `uniform(1 - jitter, 1 + jitter)`, with
  `asyncio.sleep` (never blocking the loop; cancellable), and logs one structlog warning `event` with
  `attempt=n`, `attempts`, `error` ("Type: message"), `delay_s` and the caller's `log_fields`.
- When the last attempt fails transiently, that last error is re-raised unchanged (tenacity's `reraise=True`),
  so the caller turns it into its own error type and message, exactly as when it is not retried.
- There is no overall deadline: the total time is bounded by the attempts' own timeouts plus the waits.

Built on tenacity (a base dependency) rather than three hand-written loops: the stop/wait/retry mechanics are
the well-tested library's, and each client (trainer/engines/client, shared/client, the remote retriever) keeps
only its declared `RetryPolicy` and the translation of its final error. Imports neither torch nor trainer nor
env_server.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

log = structlog.get_logger(__name__)

T = TypeVar("T")

SERVER_ERRORS = range(500, 1000)
"""5xx answers (aiohttp reads any 3-digit status, so 'the server failed' is every status >= 500)."""


class StatusError(Exception):
    """An answer with an unwanted HTTP status, raised by an attempt so that the policy can retry it."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {detail}")


@dataclass(frozen=True)
class RetryPolicy:
    """What is retried, how often and how long to wait between tries."""

    attempts: int
    """Tries in all, >= 1 (1: never retried)."""
    backoff_s: float
    """Wait after the first failed try; doubled after each further one."""
    max_backoff_s: float = math.inf
    """Cap on one wait, applied before the jitter."""
    jitter: float = 0.0
    """Each wait is multiplied by uniform(1 - jitter, 1 + jitter), so clients that failed together spread out."""
    errors: tuple[type[BaseException], ...] = ()
    """Exception types that are transient (subclasses included)."""
    statuses: Container[int] = ()
    """Statuses of a raised `StatusError` that are transient, e.g. `SERVER_ERRORS`."""

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0 or not 0 <= self.jitter < 1:
            raise ValueError(
                f"need attempts >= 1, backoff_s >= 0, max_backoff_s >= 0, 0 <= jitter < 1; got attempts={self.attempts} "
                f"backoff_s={self.backoff_s} max_backoff_s={self.max_backoff_s} jitter={self.jitter}"
            )

    def is_transient(self, error: BaseException) -> bool:
        if not isinstance(error, Exception):  # a cancel or an exit is never retried, whatever `errors` says
            return False
        if isinstance(error, StatusError) and error.status in self.statuses:
            return True
        return isinstance(error, self.errors)

    def wait_s(self, failed_attempt: int) -> float:
        """The wait after attempt `failed_attempt` (1-based) failed transiently."""
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (failed_attempt - 1))
        if self.jitter:
            delay *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return delay


async def with_retries(
    policy: RetryPolicy,
    once: Callable[[], Awaitable[T]],
    *,
    event: str,
    logger: Any = None,
    **log_fields: Any,
) -> T:
    """Await `once()` until it returns, raises a non-transient error, or `policy.attempts` tries failed
    transiently (then the last error is re-raised). `logger` (default: this module's) gets each retry's warning."""
    if not inspect.iscoroutinefunction(once):
        raise TypeError(f"with_retries needs a coroutine function, got {once!r}")
    logger = log if logger is None else logger

    def log_retry(state: RetryCallState) -> None:
        assert state.outcome is not None and state.next_action is not None
        error = state.outcome.exception()
        logger.warning(
            event,
            attempt=state.attempt_number,
            attempts=policy.attempts,
            error=f"{type(error).__name__}: {error}",
            delay_s=round(state.next_action.sleep, 4),
            **log_fields,
        )

    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts),
        wait=lambda state: policy.wait_s(state.attempt_number),
        retry=retry_if_exception(policy.is_transient),
        before_sleep=log_retry,
        reraise=True,
    )
    return await retrying(once)

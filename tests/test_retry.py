"""`shared.retry`: real attempts against real servers on loopback (a flaky aiohttp app, a dead port, a socket that
drops every connection) and plain coroutines; no patches. Also the env client's safe/unsafe split on top of it."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.client import EnvClient
from shared.retry import SERVER_ERRORS, RetryPolicy, StatusError, with_retries


class Recorder:
    """Stands in for a structlog logger: records `warning(event, **fields)` calls."""

    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append((event, fields))


class Flaky:
    """An HTTP server that answers `fail_status` to the first `failures` requests, then 200 "ok"."""

    def __init__(self, failures: int, fail_status: int = 503) -> None:
        self.failures = failures
        self.fail_status = fail_status
        self.hits = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.hits <= self.failures:
            return web.Response(status=self.fail_status, text=f"failure {self.hits}")
        return web.Response(text="ok")


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[Flaky, str]]:
    fake = Flaky(0)
    app = web.Application()
    app.router.add_get("/", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield fake, str(server.make_url("/"))
    finally:
        await server.close()


def dead_url() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def fetch(session: aiohttp.ClientSession, url: str) -> Any:
    async def once() -> str:
        async with session.get(url) as resp:
            text = await resp.text()
        if resp.status != 200:
            raise StatusError(resp.status, text)
        return text

    return once


HTTP = RetryPolicy(attempts=4, backoff_s=0.001, errors=(aiohttp.ClientConnectionError,), statuses=SERVER_ERRORS)


async def test_5xx_then_ok_is_retried_until_it_succeeds(flaky: tuple[Flaky, str]) -> None:
    fake, url = flaky
    fake.failures = 3
    rec = Recorder()
    async with aiohttp.ClientSession() as session:
        assert await with_retries(HTTP, fetch(session, url), event="t_retry", logger=rec, url=url) == "ok"
    assert fake.hits == 4
    assert [f["attempt"] for _, f in rec.warnings] == [1, 2, 3]
    event, fields = rec.warnings[0]
    assert event == "t_retry" and fields["url"] == url and fields["attempts"] == 4
    assert fields["error"] == "StatusError: HTTP 503: failure 1"


async def test_5xx_every_time_reraises_the_last_error_after_all_attempts(flaky: tuple[Flaky, str]) -> None:
    fake, url = flaky
    fake.failures = 10
    rec = Recorder()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(StatusError) as ei:
            await with_retries(HTTP, fetch(session, url), event="t_retry", logger=rec)
    assert fake.hits == 4 and len(rec.warnings) == 3, "4 attempts, 3 waits: no wait or log after the last one"
    assert ei.value.status == 503 and ei.value.detail == "failure 4"


async def test_a_status_outside_the_policy_is_not_retried(flaky: tuple[Flaky, str]) -> None:
    fake, url = flaky
    fake.failures, fake.fail_status = 10, 404
    rec = Recorder()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(StatusError, match="HTTP 404: failure 1"):
            await with_retries(HTTP, fetch(session, url), event="t_retry", logger=rec)
    assert fake.hits == 1 and rec.warnings == []


async def test_dead_port_is_retried_then_the_connection_error_is_reraised() -> None:
    rec = Recorder()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await with_retries(HTTP, fetch(session, dead_url()), event="t_retry", logger=rec)
    assert len(rec.warnings) == 3 and rec.warnings[0][1]["error"].startswith("ClientConnectorError: ")


class Script:
    """A coroutine that raises the scripted errors in turn, then returns the number of calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.calls


async def call(policy: RetryPolicy, script: Script, rec: Recorder | None = None) -> int:
    async def once() -> int:
        return await script()

    return await with_retries(policy, once, event="t_retry", logger=rec or Recorder())


async def test_only_the_policys_exception_types_are_retried() -> None:
    policy = RetryPolicy(attempts=5, backoff_s=0, errors=(ConnectionError,))
    script = Script(ConnectionResetError("reset"), ConnectionRefusedError("refused"))  # subclasses count
    assert await call(policy, script) == 3
    script = Script(ConnectionResetError("reset"), ValueError("bad answer"), ConnectionResetError("never reached"))
    with pytest.raises(ValueError, match="bad answer"):
        await call(policy, script)
    assert script.calls == 2, "a non-transient error ends the loop at once"


async def test_one_attempt_means_no_retry() -> None:
    script = Script(ConnectionResetError("reset"))
    with pytest.raises(ConnectionResetError):
        await call(RetryPolicy(attempts=1, backoff_s=0, errors=(ConnectionError,)), script)
    assert script.calls == 1


async def test_waits_double_up_to_the_cap_and_really_pass() -> None:
    rec = Recorder()
    policy = RetryPolicy(attempts=5, backoff_s=0.02, max_backoff_s=0.05, errors=(ConnectionError,))
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError):
        await call(policy, Script(*[ConnectionError(str(i)) for i in range(5)]), rec)
    elapsed = time.perf_counter() - t0
    assert [f["delay_s"] for _, f in rec.warnings] == [0.02, 0.04, 0.05, 0.05]
    assert elapsed >= 0.16


async def test_jitter_stays_within_its_band() -> None:
    rec = Recorder()
    policy = RetryPolicy(attempts=30, backoff_s=0.001, max_backoff_s=0.001, jitter=0.25, errors=(ConnectionError,))
    with pytest.raises(ConnectionError):
        await call(policy, Script(*[ConnectionError(str(i)) for i in range(30)]), rec)
    delays = [f["delay_s"] for _, f in rec.warnings]
    assert len(delays) == 29 and all(0.00075 <= d <= 0.00125 for d in delays) and len(set(delays)) > 1


async def test_waiting_does_not_block_the_loop_and_is_cancellable() -> None:
    script = Script(*[ConnectionError(str(i)) for i in range(10)])
    task = asyncio.create_task(call(RetryPolicy(attempts=10, backoff_s=10, errors=(ConnectionError,)), script))
    ticks = 0
    for _ in range(5):  # the loop keeps running while the retry waits its 10 s
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks == 5 and script.calls == 1 and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert script.calls == 1, "no attempt after a cancel"


async def test_cancelled_error_is_never_retried_even_if_the_policy_names_it() -> None:
    script = Script(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await call(RetryPolicy(attempts=3, backoff_s=0, errors=(BaseException, asyncio.CancelledError)), script)
    assert script.calls == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"attempts": 0, "backoff_s": 0.1},
        {"attempts": 2, "backoff_s": -1},
        {"attempts": 2, "backoff_s": 0.1, "max_backoff_s": -1},
        {"attempts": 2, "backoff_s": 0.1, "jitter": 1.0},
    ],
)
def test_bad_policies_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="need attempts >= 1"):
        RetryPolicy(**bad)


async def test_a_plain_function_returning_a_coroutine_is_refused() -> None:
    script = Script()
    with pytest.raises(TypeError, match="coroutine function"):
        await with_retries(RetryPolicy(attempts=2, backoff_s=0), lambda: script(), event="t_retry")
    assert script.calls == 0


# ---------------------------------------------------------------------------------------------- the env client on it
class Dropper:
    """A TCP server that reads a request and closes the connection without answering (ServerDisconnectedError)."""

    def __init__(self) -> None:
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.close()
        await writer.wait_closed()


@pytest.fixture
async def dropper() -> AsyncIterator[tuple[Dropper, str]]:
    d = Dropper()
    server = await asyncio.start_server(d.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield d, f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def test_env_client_resends_a_dropped_safe_call_but_never_a_step(dropper: tuple[Dropper, str]) -> None:
    """A dropped connection may have reached the server: only calls that change nothing are sent again."""
    d, url = dropper
    async with EnvClient(url, retries=2, backoff_s=0.001) as env:
        # /retrieve is a safe POST (aiohttp itself re-sends an idempotent GET once after a disconnect).
        with pytest.raises(ConnectionError, match=rf"env server {url} unreachable \(POST /retrieve\)"):
            await env.retrieve(["x"])
        assert d.connections == 3
        with pytest.raises(ConnectionError, match=r"unreachable \(POST /v1/episodes/ep_1/step\)"):
            await env.step("ep_1", action="<answer> x </answer>")
        assert d.connections == 4, "a step is never sent twice"


async def test_env_client_retries_a_refused_connection_even_for_a_step() -> None:
    url = dead_url()
    async with EnvClient(url, retries=1, backoff_s=0.001) as env:
        with pytest.raises(
            ConnectionError, match=rf"env server {url} unreachable \(POST /v1/episodes/ep_1/step\)"
        ) as ei:
            await env.step("ep_1", action="x")
    assert isinstance(ei.value.__cause__, aiohttp.ClientConnectorError)


def test_the_helper_imports_no_process_package() -> None:
    """shared/ is imported by env_server, trainer and tools: it must pull in none of them, nor torch."""
    code = (
        "import sys, shared.retry; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer', 'env_server', 'tools')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])

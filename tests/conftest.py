"""Shared fixtures: a REAL env server on loopback over the REAL synthetic world and its search index.

Nothing of ours is mocked. The synthetic world and its tantivy index are built once per test session into a
temporary cache folder; every in-process server shares those resources (`init_app(cfg, resources)`), so starting a
server costs milliseconds. Other test modules import the fixtures below by name and the helpers with
`from conftest import ...`: keep these names and signatures stable.

Fixtures
- `cache_dir` (session) -> Path: a TRACE_CACHE_DIR shared by the whole-loop runs (smoke, overlap), built once.
- `env_cache_dir` (session) -> Path: the TRACE cache folder holding the synthetic world (`TRACE_CACHE_DIR` for
  subprocess servers, `cache_dir=` for in-process ones).
- `env_resources` (session) -> `Resources`: the synthetic world's datasets and search index, opened once.
- `make_env_server` (function) -> async factory `await make_env_server(**config_overrides) -> LiveServer`: a fresh
  app (own episode store, own metrics) on the shared resources, listening on 127.0.0.1:<free port>; closed at
  teardown. Pass `resources=None` to make the app open its own (e.g. with `retriever_url=...`).
- `env_server` (function) -> `LiveServer` with the default config.
- `env_client` (function) -> `EnvClient` (MessagePack) on `env_server`.
- `http` (function) -> `RawHTTP` on `env_server`: raw calls in JSON or MessagePack that return the status code.
- `make_slow_retriever` (function) -> async factory `await make_slow_retriever(delay_s) -> SlowRetriever`: a
  Search-R1-style `POST /retrieve` server on loopback that waits `delay_s` per request and answers deterministic
  hits made from the query text; `.url`, `.calls`.

- `tiny_model` (session) -> Path: the tiny Qwen3 model folder (built from a config, no download).
- `engine_url` (function) -> str: a real CPU engine server (`engine`) on loopback serving `tiny_model`.

Helpers: `LiveServer`, `RawHTTP`, `Reply`, `SlowRetriever`, `start_server_process` (a `python -m env_server serve`
subprocess; waits for its "listening on" line), `stop_process`, `metric_value` (one sample of /metrics text).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from env_server.app import SERVICE, init_app
from env_server.config import ServerConfig, load_config
from env_server.service import EnvService, Resources, build_resources
from shared.client import EnvClient

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
JSON = "application/json"
MSGPACK = "application/msgpack"
FORMATS = (JSON, MSGPACK)
"""Both wire encodings; parametrize contract tests over these."""

_LISTENING = re.compile(r"TRACE env server listening on (http://\S+)")


# ---------------------------------------------------------------------------------------------- servers in-process
@dataclass
class LiveServer:
    """A running in-process env server."""

    url: str  # http://127.0.0.1:PORT, no trailing slash
    app: web.Application
    cfg: ServerConfig

    @property
    def service(self) -> EnvService:
        """The app's EnvService (episode store, metrics): for white-box checks only, never to drive the server."""
        return self.app[SERVICE]


@pytest.fixture(scope="session")
def env_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trace-cache")


@pytest.fixture(scope="session")
def env_resources(env_cache_dir: Path) -> Iterator[Resources]:
    res = build_resources(load_config(cache_dir=str(env_cache_dir), port=0))
    yield res
    asyncio.run(res.aclose())


_DEFAULT = object()


@pytest.fixture
async def make_env_server(
    env_cache_dir: Path, env_resources: Resources
) -> AsyncIterator[Callable[..., Awaitable[LiveServer]]]:
    servers: list[TestServer] = []

    async def make(resources: Any = _DEFAULT, **overrides: Any) -> LiveServer:
        overrides.setdefault("cache_dir", str(env_cache_dir))
        overrides.setdefault("log_level", "warning")
        cfg = load_config(port=0, **overrides)
        app = init_app(cfg, env_resources if resources is _DEFAULT else resources)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return LiveServer(str(server.make_url("")).rstrip("/"), app, cfg)

    yield make
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def env_server(make_env_server: Callable[..., Awaitable[LiveServer]]) -> LiveServer:
    return await make_env_server()


@pytest.fixture
async def env_client(env_server: LiveServer) -> AsyncIterator[EnvClient]:
    async with EnvClient(env_server.url) as client:
        yield client


# ---------------------------------------------------------------------------------------------- raw HTTP
@dataclass
class Reply:
    """One HTTP answer: status, decoded body (JSON/MessagePack -> Python data; anything else -> bytes)."""

    status: int
    body: Any
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)

    def error_code(self) -> str:
        """The `error.code` of an error answer; asserts the contract's error shape on the way."""
        assert isinstance(self.body, dict) and set(self.body) == {"error"}, self.body
        assert set(self.body["error"]) == {"code", "message"}, self.body
        assert self.body["error"]["message"], self.body
        return self.body["error"]["code"]


class RawHTTP:
    """Plain HTTP calls to a server in either encoding, for contract tests (the client hides status codes)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.token = token
        self.session = aiohttp.ClientSession()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        fmt: str = JSON,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """`body` is encoded in `fmt` (Content-Type and Accept = fmt unless `headers` override); `raw` is sent as is."""
        hdrs = {"Content-Type": fmt, "Accept": fmt}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        hdrs.update(headers or {})
        hdrs = {k: v for k, v in hdrs.items() if v is not None}
        data = raw
        if data is None and body is not None:
            data = msgpack.packb(body) if fmt == MSGPACK else json.dumps(body).encode()
        async with self.session.request(method, self.url + path, data=data, headers=hdrs) as resp:
            payload = await resp.read()
            ct = resp.headers.get("Content-Type", "").split(";")[0]
            decoded: Any = payload
            if ct == JSON:
                decoded = json.loads(payload)
            elif ct == MSGPACK:
                decoded = msgpack.unpackb(payload)
            return Reply(resp.status, decoded, ct, dict(resp.headers))

    async def aclose(self) -> None:
        await self.session.close()


@pytest.fixture
async def http(env_server: LiveServer) -> AsyncIterator[RawHTTP]:
    raw = RawHTTP(env_server.url)
    yield raw
    await raw.aclose()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in Prometheus text (0.0 if absent). `labels` must match exactly."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name:
            got = ",".join(sorted(p for p in (m.group(2) or "").split(",") if p))
            if got == want:
                return float(m.group(3))
    return 0.0


# ---------------------------------------------------------------------------------------------- slow retriever
@dataclass
class SlowRetriever:
    """A Search-R1-style /retrieve server on loopback that sleeps `delay_s` per request."""

    url: str
    delay_s: float
    calls: int = 0


def _fake_hits(query: str, topk: int) -> list[dict[str, Any]]:
    words = query.split() or ["empty"]
    return [
        {
            "document": {"id": f"d{i}", "contents": f'"{words[i % len(words)]}"\nabout {query} #{i}'},
            "score": 1.0 / (i + 1),
        }
        for i in range(topk)
    ]


@pytest.fixture
async def make_slow_retriever() -> AsyncIterator[Callable[[float], Awaitable[SlowRetriever]]]:
    runners: list[web.AppRunner] = []

    async def make(delay_s: float) -> SlowRetriever:
        state = SlowRetriever("", delay_s)

        async def retrieve(request: web.Request) -> web.Response:
            body = await request.json()
            state.calls += 1
            await asyncio.sleep(state.delay_s)
            return web.json_response({"result": [_fake_hits(q, body.get("topk", 3)) for q in body["queries"]]})

        app = web.Application()
        app.router.add_post("/retrieve", retrieve)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return state

    yield make
    for runner in runners:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------------- subprocess servers
def start_server_process(
    args: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 30.0, exe: list[str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start `python -m env_server serve --port 0 ARGS` (or `exe + args`); return (process, base URL) once it prints
    its "listening on" line. stderr goes to the process's pipe (read it after `stop_process` on failure)."""
    cmd = exe + args if exe is not None else [PYTHON, "-m", "env_server", "serve", "--port", "0", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = _LISTENING.search(line)
        if m:
            return proc, m.group(1)
    out, err = stop_process(proc)
    raise AssertionError(f"server did not start: {cmd}\nstdout: {''.join(lines)}{out}\nstderr: {err[-3000:]}")


def stop_process(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> tuple[str, str]:
    """Signal a process started by `start_server_process` and collect its remaining output (kills it on timeout)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return out, err + "\n[killed after timeout]"


# ---------------------------------------------------------------------------------------------- the debug run, smaller
DEBUG_SMALL = [
    "run.prompts_per_step=3",
    "sft.max_examples=24",
    "sft.batch_size=12",
    "allocation.root_budget=6",
    "allocation.m_max=3",
    "rollout.max_new_tokens=32",
    "env.train_limit=5",
]
"""configs/debug.toml made smaller for the tests that run the whole loop (smoke, overlap, trace-view's page). One list,
so their SFT warm starts share a cache key and are built once a session (`cache_dir`)."""


# ---------------------------------------------------------------------------------------------- the CPU engine
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
async def engine_url(tiny_model: Path) -> AsyncIterator[str]:
    from engine.app import ServerConfig as EngineServerConfig
    from engine.app import init_app as init_engine_app
    from engine.engine import EngineConfig

    app = init_engine_app(EngineServerConfig(engine=EngineConfig(model_path=tiny_model, seed=0)))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One TRACE cache (TRACE_CACHE_DIR) for the whole-loop runs of every module: the tiny model, the world and the
    SFT warm start of the debug config are built once per test session (their cache keys keep different settings
    apart)."""
    return tmp_path_factory.mktemp("trace-cache")


# ---------------------------------------------------------------------------------------------- the sglang tier
def sglang_skip_reason() -> str | None:
    """Why the `sglang`-marked tests cannot run here (None: they can): sglang not importable, or neither CUDA nor
    SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1, which tools/sglang-cpu/run-tests sets with its shim)."""
    from trainer.engines.launcher import sglang_available

    if not sglang_available():  # checked first: it does not import torch
        return "sglang is not installed (tools/sglang-cpu/run-tests makes a venv with it)"
    import torch

    if not torch.cuda.is_available() and os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        return "no CUDA device and SGLANG_USE_CPU_ENGINE is not 1 (on CPU: tools/sglang-cpu/run-tests)"
    return None


# The sglang tier's server flags. On CUDA: a small memory share each (two servers on one GPU), no CUDA graphs (a
# fast start). 0.5.23's own argument parser accepts all of these.
GPU_SERVER_ARGS = [
    "--dtype",
    "float32",
    "--mem-fraction-static",
    "0.15",
    "--context-length",
    "4096",
    "--attention-backend",
    "triton",
    "--sampling-backend",
    "pytorch",
    "--disable-prefill-cuda-graph",  # 0.5.23 deprecates --disable-cuda-graph
    "--disable-decode-cuda-graph",
    "--random-seed",
    "0",
]
# SGLang's CPU engine (../shared/SGLANG_CPU.md): torch attention, a bounded KV pool (else it is sized from RAM), no
# overlap scheduler, torch sampling. tests/test_sglang_train.py launches it with these through the trainer.
SGLANG_CPU_ENGINE_ARGS = [
    "--device",
    "cpu",
    "--attention-backend",
    "torch_native",
    "--max-total-tokens",
    "65536",
    "--context-length",
    "4096",
    "--disable-overlap-schedule",
    "--sampling-backend",
    "pytorch",
]
# The tier's own servers: float32 (the trainer's forward is their logprobs' reference), a fixed seed.
CPU_SERVER_ARGS = [*SGLANG_CPU_ENGINE_ARGS, "--dtype", "float32", "--random-seed", "0"]
ON_SGLANG_CPU = os.environ.get("SGLANG_USE_CPU_ENGINE") == "1"


def server_args() -> list[str]:
    """The flags every sglang-tier server starts with, for this machine (SGLang's CPU engine or CUDA)."""
    return list(CPU_SERVER_ARGS if ON_SGLANG_CPU else GPU_SERVER_ARGS)


# ---------------------------------------------------------------------------------------------- top logprobs
def assert_top_logprobs(row: list[tuple[float, int]], ref: Any, tol: float) -> None:
    """An engine's top logprobs for one token, (logprob, token_id) largest first, against `ref`, the reference's
    logprobs over the whole vocabulary (a float64 tensor): position by position the reference's top values within
    `tol`, and each token's own reference logprob within `tol` of what the engine gave. Near-tied tokens may come in
    either order (their order rests on float rounding, which differs between machines and kernels); a wrong token or
    a wrong value fails."""
    values = ref.topk(len(row)).values.tolist()
    assert [lp for lp, _ in row] == sorted((lp for lp, _ in row), reverse=True), row
    for (lp, tok), want in zip(row, values, strict=True):
        assert abs(lp - want) < tol, (row, values)
        assert abs(lp - float(ref[tok])) < tol, (tok, lp, float(ref[tok]))


# ---------------------------------------------------------------------------------------------- the browser tier
@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Debian chromium driven by Selenium through chromium-driver (the `browser` tier, tools/browser/run-tests);
    skipped where either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (tools/browser/run-tests)")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("chromium / chromium-driver are not installed (tools/browser/run-tests installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
        opts.add_argument(flag)
    b = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))
    yield b
    b.quit()

"""Run engine servers as child processes: real SGLang on a GPU, or our CPU engine (DESIGN §3).

`EngineProcess` (made by `launch_engine(cmd, url)`) is an async context manager that
- starts `cmd` in its own process group (a new session), stdout and stderr appended to a log
  file (`log_path`, or a fresh temporary file whose path every error names);
- waits until `GET url + ready_path` answers 200 (default `/health_generate`, which SGLang answers
  after a real 1-token generation), polling every `poll_s`; if the process exits first it fails
  at once, and past `startup_timeout_s` it fails too, both with the exit code or last status and
  the tail of the log;
- on exit (or a failed start) stops the whole group: SIGTERM, up to `stop_timeout_s` for the
  leader to exit, then SIGKILL; then gives stragglers of the group 5 s before SIGKILL. It only
  ever signals the group it created. The defaults keep that under the 30 s a launcher (torchrun,
  accelerate launch) gives a SIGTERM'd rank before its SIGKILL: 20 s + 5 s.
- dies with this process however it ends, SIGKILL included (Linux): the command runs through
  `die_with_parent`, which arms the parent-death signal (prctl PR_SET_PDEATHSIG, SIGKILL) and then
  execs it; the setting survives exec, so the server itself is killed when its parent goes. SGLang's
  own workers (scheduler, detokenizer) arm the same signal against the server. The "parent" is the
  thread that started the child: here the event loop's, which lives as long as the loop that stops it.

`SGLangServer(model_path, port=...)` is an `EngineProcess` running
`python -m sglang.launch_server --model-path M --host H --port P --enable-metrics [extra_args]`
(SGLang 0.5.23 recommends `sglang serve` but still supports the module, which needs no PATH).
It raises `EngineLaunchError` at once when sglang is not importable.

Why no `--skip-tokenizer-init` by default: token-in/token-out comes from sending `input_ids` and
reading `output_ids`, which SGLang does with or without its tokenizer loaded. Without a tokenizer
(the flag) SGLang rejects stop strings, `stop_regex` and `min_new_tokens > 0` with 400
(`sampling_params.py: raise_if_tokenizer_required`), and stopping at multi-token tags such as
`</search>` needs stop strings. The flag only saves detokenization work; pass
`skip_tokenizer_init=True` when every stop is a single token (`stop_token_ids`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import structlog

from trainer.engines.client import EngineError

log = structlog.get_logger(__name__)

_STRAGGLER_WAIT_S = 5.0
_LOG_TAIL_LINES = 40
SGLANG_INSTALL_HINT = (
    "pip install 'trace-rl[sglang]' on a GPU machine (sglang's kernels need CUDA; sglang 0.5.23 pins "
    "torch==2.14.1 and transformers==5.19.0 and needs Python >= 3.11)"
)


_PDEATHSIG_EXEC = """import ctypes, os, sys
parent, sig = int(sys.argv[1]), int(sys.argv[2])
if ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
    sys.exit(f"die_with_parent: prctl(PR_SET_PDEATHSIG) failed, errno {ctypes.get_errno()}")
if os.getppid() != parent:  # the parent died before the signal was armed: it would never come
    sys.exit(f"die_with_parent: parent {parent} gone before {sys.argv[3]!r} started")
os.execvp(sys.argv[3], sys.argv[3:])
"""


def die_with_parent(cmd: Sequence[str], sig: signal.Signals = signal.SIGKILL) -> list[str]:
    """`cmd`, run so that its process gets `sig` when the thread that starts it (and so this process) dies, however
    it dies: a small Python prologue arms Linux's parent-death signal, checks the parent is still there, and execs
    `cmd` in its place (same pid; the setting survives exec). Elsewhere than Linux, `cmd` unchanged."""
    if not sys.platform.startswith("linux"):
        return [str(c) for c in cmd]
    return [sys.executable, "-c", _PDEATHSIG_EXEC, str(os.getpid()), str(int(sig)), *map(str, cmd)]


class EngineLaunchError(EngineError):
    """An engine process could not be started, exited early, or never became ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (another process may still take it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def url_for(host: str, port: int) -> str:
    """The base URL a client on this machine uses for a server bound to `host:port`."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class EngineProcess:
    """One engine server child process; `async with` starts it, waits until ready and stops it."""

    def __init__(
        self,
        cmd: Sequence[str],
        url: str,
        *,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        ready_path: str = "/health_generate",
        startup_timeout_s: float = 600.0,
        stop_timeout_s: float = 20.0,
        poll_s: float = 0.5,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        if not cmd:
            raise ValueError("cmd is empty")
        self.cmd = [str(c) for c in cmd]
        self.url = url.rstrip("/")
        self.env = dict(env or {})
        self.log_path = Path(log_path) if log_path is not None else None
        self.ready_path = ready_path
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        self.cwd = cwd
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    async def __aenter__(self) -> EngineProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the process and wait until it is ready; on any failure the process group is stopped."""
        if self._proc is not None:
            raise EngineLaunchError(f"{self.url}: already started (pid {self._proc.pid})")
        if shutil.which(self.cmd[0]) is None:  # said here: `die_with_parent`'s exec would fail in the child
            raise EngineLaunchError(f"cannot run {self.cmd}: {self.cmd[0]!r} is no executable program (PATH searched)")
        with self._open_log() as log_file:  # the child keeps its own copy of the descriptor
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *die_with_parent(self.cmd),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**_child_environ(), **self.env},
                    cwd=self.cwd,
                    start_new_session=True,
                )
            except OSError as e:
                raise EngineLaunchError(f"cannot run {self.cmd}: {e}") from e
        log.info("engine_process_started", pid=self._proc.pid, url=self.url, cmd=self.cmd, log_path=str(self.log_path))
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    def _open_log(self) -> BinaryIO:
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="trace-engine-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        return open(self.log_path, "ab")

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        proc = self._proc
        t0 = time.monotonic()
        deadline = t0 + self.startup_timeout_s
        last = "no answer yet"
        async with aiohttp.ClientSession() as session:
            while True:
                if proc.returncode is not None:
                    raise EngineLaunchError(
                        f"engine process exited with code {proc.returncode} before {self.url}{self.ready_path} "
                        f"answered 200 (cmd: {self.cmd}); last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                remaining = deadline - time.monotonic()
                try:
                    timeout = aiohttp.ClientTimeout(total=max(1.0, min(30.0, remaining)))
                    async with session.get(self.url + self.ready_path, timeout=timeout) as resp:
                        if resp.status == 200:
                            log.info("engine_process_ready", url=self.url, seconds=round(time.monotonic() - t0, 2))
                            return
                        last = f"HTTP {resp.status}"
                except (aiohttp.ClientError, TimeoutError, asyncio.TimeoutError) as e:  # noqa: UP041 (3.10)
                    last = f"{type(e).__name__}: {e}"
                if time.monotonic() >= deadline:
                    raise EngineLaunchError(
                        f"{self.url}{self.ready_path} not ready within {self.startup_timeout_s:g}s (last: {last}; "
                        f"cmd: {self.cmd}); last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                try:  # sleep, but wake at once if the process exits
                    await asyncio.wait_for(proc.wait(), timeout=min(self.poll_s, max(0.0, deadline - time.monotonic())))
                except (TimeoutError, asyncio.TimeoutError):  # noqa: UP041 (3.10)
                    pass

    async def stop(self) -> None:
        """Stop the process group (SIGTERM, then SIGKILL). Idempotent."""
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        if proc.returncode is None:
            _killpg(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=self.stop_timeout_s)
            except (TimeoutError, asyncio.TimeoutError):  # noqa: UP041 (3.10)
                log.warning("engine_process_kill", pid=pgid, after_s=self.stop_timeout_s)
                _killpg(pgid, signal.SIGKILL)
                await proc.wait()
        # Children of the leader (SGLang's scheduler and detokenizer) may outlive it.
        deadline = time.monotonic() + _STRAGGLER_WAIT_S
        while _group_alive(pgid):
            if time.monotonic() >= deadline:
                log.warning("engine_process_group_kill", pgid=pgid)
                _killpg(pgid, signal.SIGKILL)
                break
            await asyncio.sleep(0.1)
        log.info("engine_process_stopped", pid=pgid, returncode=proc.returncode, url=self.url)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last `lines` lines of the process's log ("" when there is none yet)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                  "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def _child_environ() -> dict[str, str]:
    """This process's environment without what torchrun / accelerate launch set for the training ranks (RANK,
    WORLD_SIZE, MASTER_PORT, TORCHELASTIC_*, ACCELERATE_*): a server launched by rank 0 is not a training rank, and
    torch.distributed code in it (SGLang's own groups, the weight group) must not take those for its own."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and not k.startswith(("TORCHELASTIC_", "ACCELERATE_", "FSDP_"))
    }


def launch_engine(cmd: Sequence[str], url: str, **kwargs: Any) -> EngineProcess:
    """An `EngineProcess` for any engine command (keyword arguments as EngineProcess's), e.g. our CPU engine:
    `async with launch_engine(["trace-engine", "serve", "--model", d, "--port", p], url) as engine: ...`"""
    return EngineProcess(cmd, url, **kwargs)


def sglang_available() -> bool:
    """Whether `import sglang` can work in this interpreter (it is not imported here)."""
    return importlib.util.find_spec("sglang") is not None


class SGLangServer(EngineProcess):
    """A real SGLang server (`python -m sglang.launch_server`) as a child process."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        port: int,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        skip_tokenizer_init: bool = False,
        enable_metrics: bool = True,
        python: str | None = None,
        startup_timeout_s: float = 900.0,
        stop_timeout_s: float = 20.0,
    ) -> None:
        self._python = python
        cmd = [python or sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path)]
        cmd += ["--host", host, "--port", str(port)]
        if skip_tokenizer_init:
            cmd.append("--skip-tokenizer-init")
        if enable_metrics:
            cmd.append("--enable-metrics")
        cmd += [str(a) for a in extra_args]
        super().__init__(
            cmd,
            url_for(host, port),
            env=env,
            log_path=log_path,
            startup_timeout_s=startup_timeout_s,
            stop_timeout_s=stop_timeout_s,
            poll_s=1.0,
        )

    async def start(self) -> None:
        # With another interpreter (`python=`), a missing sglang shows up as an early exit instead.
        if self._python is None and not sglang_available():
            raise EngineLaunchError(f"sglang is not importable in {sys.executable}: {SGLANG_INSTALL_HINT}")
        await super().start()


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is still in group `pgid`. Zombies are skipped: a container
    whose PID 1 does not reap orphans would otherwise keep the group "alive" for ever."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: any member, zombie or not
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process exited while we looked
            continue
        # after "pid (comm)": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False

"""No orphans (issue 20 §4): every child `trace-train` starts (the env server, the engines) dies with it.

A real `trace-train` on the debug config is started and, once its env server and its engine are up, killed: with
SIGKILL (nothing of it runs again; the children go by Linux's parent-death signal, armed before they exec) and
with SIGTERM (what torchrun sends first: the trainer stops them itself, well within torchrun's 30 s grace before
its SIGKILL). Before the fix both children were alive 8 s after a SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GRACE_S = 30.0  # torchrun's (and accelerate launch's) SIGTERM -> SIGKILL grace


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after "(comm)": state, ppid, pgrp, ... (None once the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    s = _stat(pid)
    return s is not None and s[0] != "Z"


def group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) members of process group `pgid`."""
    out = []
    for p in Path("/proc").glob("[0-9]*"):
        s = _stat(int(p.name))
        if s is not None and s[0] != "Z" and int(s[2]) == pgid:
            out.append(int(p.name))
    return out


def children(pid: int) -> dict[int, str]:
    """Live children of `pid`, with their command lines."""
    out = {}
    for p in Path("/proc").glob("[0-9]*"):
        s = _stat(int(p.name))
        if s is not None and s[0] != "Z" and int(s[1]) == pid:
            try:
                out[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "term"])
def test_trace_train_killed_leaves_no_child(sig: signal.Signals, tmp_path: Path, cache_dir: Path) -> None:
    cmd = [sys.executable, "-m", "trainer.cli", "--config", str(REPO / "configs" / "debug.toml")]
    cmd += ["--output-dir", str(tmp_path / "run"), "--set", "sft.enabled=false", "--steps", "50"]
    env = {**os.environ, "TRACE_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        kids: dict[int, str] = {}
        while time.monotonic() < deadline and trainer.poll() is None:
            kids = children(trainer.pid)
            if any("env_server" in c for c in kids.values()) and any("engine.cli" in c for c in kids.values()):
                break
            time.sleep(0.2)
        assert trainer.poll() is None, f"trace-train exited {trainer.returncode}: {trainer.stderr.read()[-3000:]}"
        assert len(kids) == 2, f"an env server and an engine, started by trace-train: {kids}"
        time.sleep(1.0)  # past their start: serving
        t0 = time.monotonic()
        trainer.send_signal(sig)
        trainer.wait(timeout=GRACE_S)
        exited_s = time.monotonic() - t0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(group_alive(pid) for pid in kids):
            time.sleep(0.1)
        left = {pid: kids[pid] for pid in kids if group_alive(pid)}  # each child leads its own group
        assert not left, f"alive {time.monotonic() - t0:.1f} s after {sig.name} of trace-train: {left}"
        print(f"\n{sig.name}: trace-train gone in {exited_s:.2f} s, its children within {time.monotonic() - t0:.2f} s")
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        for pid in kids:  # never leave them behind, even when the test fails
            for member in group_alive(pid):
                os.kill(member, signal.SIGKILL)

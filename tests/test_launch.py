"""Every launch form the README shows runs (issue 20: `accelerate launch ... trace-train` with the bare name failed,
since launchers run `python -u PROGRAM` and look for a file).

Each `accelerate launch` / `torchrun` line of the README's bash blocks is run on CPU: its launcher, its launcher
options and its program exactly as written, but with 2 processes (`--num_processes 2` / `--nproc-per-node 2`: the
shipped accelerate files name the 6 ranks of an 8-GPU node, and on a machine without GPUs their ranks train on CPU
over gloo, FSDP2 included) and, after the program, the debug config for one step without warm start or evals. The
run must exit 0 with one metrics row trained on 2 ranks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCHERS = {"accelerate": ["accelerate", "launch"], "torchrun": ["torchrun"]}
PROCESSES = {"accelerate": "--num_processes", "torchrun": "--nproc-per-node"}


def readme_launch_lines() -> list[str]:
    """The launch commands of the README's bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split(" #", 1)[0].strip()
            if cmd.startswith(("accelerate launch ", "torchrun ")):
                lines.append(" ".join(cmd.split()))
    return lines


def split_form(line: str) -> tuple[str, list[str], list[str]]:
    """(launcher, its options, the program) of a launch line; what follows the program is the program's own."""
    words = shlex.split(line.replace("$(which trace-train)", str(BIN / "trace-train")))
    launcher = words[0]
    rest = words[len(LAUNCHERS[launcher]) :]
    for i, w in enumerate(rest):
        if w in ("-m", "--module"):
            return launcher, rest[:i], rest[i : i + 2]
        if not w.startswith("-") and (i == 0 or not rest[i - 1].startswith("-") or "=" in rest[i - 1]):
            return launcher, rest[:i], rest[i : i + 1]  # a program path (or a bare name, which must then fail)
    raise AssertionError(f"no program in {line!r}")


def on_two_processes(launcher: str, options: list[str]) -> list[str]:
    flag = PROCESSES[launcher]
    out, skip = [], False
    for w in options:
        if skip:
            skip = False
            continue
        if w == flag:
            skip = True
            continue
        if not w.startswith(f"{flag}="):
            out.append(w)
    return [*out, flag, "2"]


def test_the_readme_shows_the_launch_forms_a_user_needs() -> None:
    forms = {(launcher, tuple(program)) for launcher, _, program in map(split_form, readme_launch_lines())}
    assert ("accelerate", ("-m", "trainer.cli")) in forms and ("torchrun", ("-m", "trainer.cli")) in forms, forms
    assert split_form("torchrun --standalone --nproc-per-node 2 trace-train --config x") == (
        "torchrun",
        ["--standalone", "--nproc-per-node", "2"],
        ["trace-train"],
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("line", readme_launch_lines())
def test_every_readme_launch_line_runs(line: str, tmp_path: Path, cache_dir: Path) -> None:
    launcher, options, program = split_form(line)
    out = tmp_path / "run"
    cmd = [str(BIN / LAUNCHERS[launcher][0]), *LAUNCHERS[launcher][1:], *on_two_processes(launcher, options)]
    cmd += [*program, "--config", str(REPO / "configs" / "debug.toml"), "--steps", "1", "--output-dir", str(out)]
    cmd += ["--set", "sft.enabled=false", "--set", "run.eval_every=0"]
    env = {**os.environ, "TRACE_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540, check=False)
    assert proc.returncode == 0, f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] and rows[0]["world_size"] == 2, rows
    assert rows[0]["trained_tokens"] > 0

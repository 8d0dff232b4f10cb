"""The env-server image, without a Docker engine: parse the Dockerfile and run its exact install and start steps.

What is reproduced, and how honestly:
- the build context: only what the Dockerfile COPYs (so a file the package needs but the image forgets fails here);
- `RUN pip install .`: PEP 517 builds a wheel of the copied tree and installs it into a FRESH venv. Offline, so
  split in two: `pip wheel --no-deps --no-build-isolation` (setuptools from the project venv), then `pip install
  --no-deps` of that wheel into the fresh venv. The dependencies are the one thing not downloaded: the project
  venv's site-packages is put on the fresh venv's path (a .pth line, after the install so pip never sees them),
  and the test checks that every requirement the wheel declares is satisfied there and that torch is not one;
- `ENV`, `WORKDIR`, `USER` (not root), `VOLUME`, `EXPOSE` are checked as written; TRACE_CACHE_DIR's volume is
  the session's prebuilt cache (a mounted /cache);
- `ENTRYPOINT` is run as is from the venv, with `--port 0` appended as `docker run IMAGE --port 0` would append
  it; the `HEALTHCHECK` command is run as is (its port swapped for the chosen one) with the venv's python first
  on PATH, as the image's python; then a create/step and SIGTERM -> exit 0.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, start_server_process, stop_process

from shared.client import SyncEnvClient

pytestmark = pytest.mark.timeout(120)

DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Instr:
    op: str
    args: str

    def json_args(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(x, str) for x in value), self
        return value


def parse_dockerfile(path: Path) -> list[Instr]:
    """Instructions in order; comments dropped, `\\` continuations joined."""
    out: list[Instr] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        op, _, args = line.partition(" ")
        out.append(Instr(op.upper(), args.strip()))
    return out


def dockerignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        pat = pat.removeprefix("**/")
        if fnmatch.fnmatch(rel, pat) or any(fnmatch.fnmatch(p, pat) for p in parts):
            return True
    return False


@pytest.fixture(scope="module")
def instrs() -> list[Instr]:
    return parse_dockerfile(DOCKERFILE)


def one(instrs: list[Instr], op: str) -> Instr:
    found = [i for i in instrs if i.op == op]
    assert len(found) == 1, f"expected one {op}, got {found}"
    return found[0]


def env_of(instrs: list[Instr]) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in instrs:
        if i.op == "ENV":
            for kv in shlex.split(i.args):
                k, _, v = kv.partition("=")
                env[k] = v
    return env


def test_dockerfile_shape(instrs: list[Instr]) -> None:
    base = one(instrs, "FROM").args
    assert base.startswith("python:3.11") and "slim" in base, base
    user = [i.args for i in instrs if i.op == "USER"]
    assert user and user[-1] not in ("root", "0"), user
    assert one(instrs, "VOLUME").json_args() == ["/data", "/index", "/cache"]
    assert env_of(instrs)["TRACE_CACHE_DIR"] == "/cache"
    assert one(instrs, "EXPOSE").args == "8000"
    entry = one(instrs, "ENTRYPOINT").json_args()
    assert entry[:2] == ["trace-env", "serve"]
    assert entry[entry.index("--host") + 1] == "0.0.0.0" and entry[entry.index("--port") + 1] == "8000"
    health = one(instrs, "HEALTHCHECK").args
    assert "CMD" in health and "/health" in health and "8000" in health
    runs = " ".join(i.args for i in instrs if i.op == "RUN")
    assert "pip install ." in runs and "torch" not in runs and "[" not in runs.split("pip install")[1].split()[0]
    patterns = dockerignore_patterns()
    for i in instrs:
        if i.op == "COPY":
            *srcs, _ = i.args.split()
            for src in srcs:
                assert (REPO / src).exists(), f"COPY {src}: no such path"
                assert not ignored(src, patterns), f"COPY {src} is excluded by .dockerignore"


def stage_context(instrs: list[Instr], dest: Path) -> Path:
    """Copy what the Dockerfile COPYs (minus .dockerignore) to dest/<WORKDIR>; return that work dir."""
    workdir = dest / one(instrs, "WORKDIR").args.lstrip("/")
    workdir.mkdir(parents=True)
    patterns = dockerignore_patterns()
    for i in instrs:
        if i.op != "COPY":
            continue
        *srcs, target = i.args.split()
        for src in srcs:
            s = REPO / src
            if s.is_dir():  # Docker copies a folder's CONTENTS to the target folder
                assert len(srcs) == 1, f"COPY {i.args}: give a folder its own COPY line"
                for f in s.rglob("*"):
                    if f.is_file() and not ignored(f.relative_to(REPO).as_posix(), patterns):
                        out = workdir / target / f.relative_to(s)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, out)
            else:
                into_folder = len(srcs) > 1 or target.endswith("/") or target == "."
                shutil.copy2(s, workdir / target / s.name if into_folder else workdir / target)
    return workdir


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_image_install_and_start_steps(instrs: list[Instr], tmp_path: Path, env_cache_dir: Path) -> None:
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the image runs Python 3.11; this interpreter cannot stand in for it")
    root = tmp_path / "image"
    app = stage_context(instrs, root)
    assert {p.name for p in app.iterdir()} == {"pyproject.toml", "README.md", "shared", "env_server"}

    # RUN pip install .  (= build the wheel of the copied tree, install it into the image's python)
    pip_lines = [i.args for i in instrs if i.op == "RUN" and i.args.startswith("pip install")]
    assert pip_lines == ["pip install ."], pip_lines
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), "."], cwd=app)
    [wheel] = list(wheels.glob("trace_rl-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    run([*pip, "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # stands in for PyPI

    check = """
import importlib.metadata as md, sys, env_server, shared
from packaging.requirements import Requirement
assert env_server.__file__.startswith(sys.prefix), env_server.__file__
assert shared.__file__.startswith(sys.prefix), shared.__file__
reqs = [Requirement(r) for r in md.requires("trace-rl")]
base = [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
assert base and not any(r.name == "torch" for r in base), base
for r in base:
    v = md.version(r.name)
    assert r.specifier.contains(v, prereleases=True), f"{r} not satisfied by {v}"
import env_server.app, env_server.cli
assert "torch" not in sys.modules and "transformers" not in sys.modules
print(len(base))
"""
    assert int(run([str(py), "-c", check], cwd=tmp_path).stdout) >= 5

    # ENTRYPOINT (+ `--port 0` appended, as `docker run IMAGE --port 0` does), with the image's ENV and PATH.
    env = {**env_of(instrs), "TRACE_CACHE_DIR": str(env_cache_dir), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    entry = one(instrs, "ENTRYPOINT").json_args()
    exe = shutil.which(entry[0], path=str(venv / "bin"))
    assert exe is not None and Path(exe).parent == venv / "bin", exe
    os_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    proc, url = start_server_process([*entry[1:], "--port", "0"], exe=[exe], env={**os_env, **env})
    try:
        port = url.rsplit(":", 1)[1]
        assert url.startswith("http://0.0.0.0:")
        health = one(instrs, "HEALTHCHECK").args
        cmd = json.loads(health[health.index("CMD") + 3 :].strip())
        cmd = [c.replace("8000", port) for c in cmd]
        probe = subprocess.run(cmd, env={**os_env, **env}, capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
        assert shutil.which(cmd[0], path=env["PATH"]) == str(venv / "bin" / cmd[0])  # the image's python

        with SyncEnvClient(f"http://127.0.0.1:{port}") as client:
            ep = client.create(dataset="synthetic", split="dev", index=0, include_oracle=True)
            for st in ep.metadata["oracle"]:
                tag = "search" if st["kind"] == "search" else "answer"
                r = client.step(ep.episode_id, action=f"<{tag}> {st['text']} </{tag}>")
            assert r.done and r.reward == 1.0
    finally:
        _, err = stop_process(proc)
    assert proc.returncode == 0, err[-2000:]
    probe = subprocess.run(cmd, env={**os_env, **env}, capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0  # unhealthy once it is gone

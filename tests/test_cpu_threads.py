"""OMP_WAIT_POLICY for the torch processes (`shared.cpu_threads`): set before torch loads, the user's value kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import sys, os; import {pkg}; "
    "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules); "
    "import {module}; print('torch' in sys.modules)"
)


@pytest.mark.parametrize(
    ("pkg", "module"), [("trainer", "trainer.cli"), ("engine", "engine.cli"), ("tools", "tools.tiny_model")]
)
@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_the_wait_policy_is_set_before_torch_loads_unless_the_user_set_one(
    pkg: str, module: str, preset: str | None
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(pkg=pkg, module=module)],
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.split()
    # the package sets it (or keeps the user's) with torch not yet loaded; its entrypoint module then loads torch
    assert out == [preset or "PASSIVE", "False", "True"]


UPDATE = """
import hashlib, torch
torch.manual_seed(0)
torch.set_num_threads(2)
m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x = torch.randn(64, 256)
for _ in range(5):
    loss = (m(x) ** 2).mean(); opt.zero_grad(); loss.backward(); opt.step()
print(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest())
"""


def test_the_wait_policy_leaves_the_numbers_alone() -> None:
    """Why a comparison may switch policies mid-way (bench/run_peers.sh exports PASSIVE for a frozen tree from
    before shared/cpu_threads.py): how idle OpenMP threads wait changes no result, bit for bit, on 2 threads. On a
    machine whose BLAS is not bit-reproducible from one process to the next (MKL can vary with memory alignment) two
    runs under the same policy already differ, and there is nothing to compare: skipped, saying so."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    def digest(policy: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", UPDATE], env={**env, "OMP_WAIT_POLICY": policy}, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.strip()

    active, again, passive = digest("ACTIVE"), digest("ACTIVE"), digest("PASSIVE")
    assert len(active) == 64, active
    if active != again:
        pytest.skip("this machine's BLAS gives different bits from one process to the next under one policy")
    assert passive == active


def test_the_engine_takes_at_most_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU engine's default threads: half the cores, capped at $TRACE_CPU_SHARE when a process given a share of
    the cores (compare_allocators --jobs) sets it; a value that is not a positive count is ignored, and so is
    $OMP_NUM_THREADS (torchrun sets it to 1 for every rank)."""
    from engine.cli import default_threads

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.delenv("TRACE_CPU_SHARE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 8
    for value, want in (("4", 4), ("12", 8), ("1", 1), ("0", 8), ("two", 8)):
        monkeypatch.setenv("TRACE_CPU_SHARE", value)
        assert default_threads() == want, value

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

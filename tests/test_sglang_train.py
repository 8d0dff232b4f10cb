"""`configs/debug.toml` end to end on a real SGLang server: the `sglang` tier (tools/sglang-cpu/run-tests).

`trace-train --config configs/debug.toml --engine sglang` as a child process, in a temporary output folder and the
test session's temporary TRACE_CACHE_DIR (the `cache_dir` fixture: world, tiny model and SFT warm start are built
there once), once per way weights reach the engine (`engine.weight_sync`): "disk" (`/update_weights_from_disk`)
and "group" (`trainer.engines.weight_sync` over a gloo or nccl group, `/update_weights_from_distributed`). The trainer
launches one SGLang server itself (`trainer.services.engines`, `--dtype` from the served model's config.json); on a
machine without CUDA, `engine.extra_args` carry SGLang's CPU flags (../shared/SGLANG_CPU.md).
Checked: exit 0, metrics.jsonl has the config's 2 step rows with tokens generated, prefixes served from SGLang's
radix cache and each step's weight version, the evaluations before and after, and the server's access log has one
weight update per step through the chosen route and none through the other.

Skipped, like tests/test_sglang_engine.py, unless sglang is importable and CUDA works or SGLANG_USE_CPU_ENGINE=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SGLANG_CPU_ENGINE_ARGS, sglang_skip_reason

REPO = Path(__file__).resolve().parents[1]


_REASON = sglang_skip_reason()
pytestmark = [pytest.mark.sglang, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

# On CUDA: the defaults, with a modest memory share and no CUDA graphs (a fast start).
GPU_ENGINE_ARGS = ["--mem-fraction-static", "0.3", "--disable-prefill-cuda-graph", "--disable-decode-cuda-graph"]


ROUTES = {"disk": "/update_weights_from_disk", "group": "/update_weights_from_distributed"}


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("weight_sync", ["disk", "group"])
def test_debug_config_on_sglang(weight_sync: str, tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "run"
    cpu = os.environ.get("SGLANG_USE_CPU_ENGINE") == "1"
    extra = SGLANG_CPU_ENGINE_ARGS if cpu else GPU_ENGINE_ARGS
    sets = [f'run.output_dir="{out}"', f"engine.extra_args={json.dumps(extra)}", f'engine.weight_sync="{weight_sync}"']
    if not cpu:  # one GPU: the policy and the server share it, on purpose (refused otherwise)
        sets.append("engine.colocate=true")
    cmd = [sys.executable, "-m", "trainer.cli", "--config", str(REPO / "configs" / "debug.toml"), "--engine", "sglang"]
    cmd += [x for s in sets for x in ("--set", s)]
    env = {**os.environ, "TRACE_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2300, check=False)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1], rows
    for r in rows:
        assert r["leaves"] > 0 and r["generated_tokens"] > 0, r
        assert 0 < r["cached_prefill_tokens"] <= r["prefill_tokens"], "branches re-send prefixes the radix cache serves"
    assert [r["weight_version"] for r in rows] == [1, 2], [r.get("weight_version") for r in rows]
    assert "eval_em_before" in rows[0] and "eval_em" in rows[-1], (rows[0].keys(), rows[-1].keys())
    assert 0.0 <= rows[0]["eval_em_before"] <= 1.0 and 0.0 <= rows[-1]["eval_em"] <= 1.0

    log = (out / "engine_0.log").read_text(errors="replace")  # the launched server's output, uvicorn's access log
    used, other = ROUTES[weight_sync], ROUTES["group" if weight_sync == "disk" else "disk"]
    assert "sglang" in log.lower(), log[-3000:]
    assert log.count(f'POST {used} HTTP/1.1" 200') == 2 and other not in log, log[-3000:]

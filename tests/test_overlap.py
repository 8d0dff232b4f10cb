"""Rollout/training overlap (DESIGN §3: "Rollouts for step t+1 run while step t trains (bounded staleness);
nothing generation needs may queue behind the optimizer").

Guards the bug where, with run.max_staleness >= 1, step t+1's collection needed featurisation and prediction on
the single torch thread, so it queued behind step t's update and weight save and no generation overlapped the
update; and the one where `TrainSample.min_weight_version` was computed and never read.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEBUG_SMALL

from trainer.algo.predictor import SuccessPredictor
from trainer.algo.staleness import drop_stale
from trainer.algo.step import TraceStep
from trainer.config import TrainConfig, load_train_config
from trainer.dumps import read_dump
from trainer.learner.config import ModelConfig, OptimConfig
from trainer.learner.policy import FeatureModel, Policy
from trainer.learner.samples import TrainSample
from trainer.loop import train

REPO = Path(__file__).resolve().parents[1]


def _sample(version: int) -> TrainSample:
    return TrainSample([1, 2], [0, 1], [0.0, 1.0], [0.0, 1.0], [0.0, -1.0], "p", 0, 1, min_weight_version=version)


def test_stale_samples_are_dropped_and_counted_never_silently() -> None:
    samples = [_sample(v) for v in (3, 2, 1, 0)]
    kept, dropped = drop_stale(samples, version=3, max_staleness=1)
    assert [s.min_weight_version for s in kept] == [3, 2] and dropped == 2
    # Fully on-policy: every rollout of a step ran on the version its update starts from, so nothing goes.
    kept, dropped = drop_stale(samples[:1], version=3, max_staleness=0)
    assert kept == samples[:1] and dropped == 0
    assert drop_stale(samples, version=3, max_staleness=3) == (samples, 0)
    with pytest.raises(AssertionError, match=r"newer than the policy's 2"):
        drop_stale(samples, version=2, max_staleness=1)


def test_feature_copy_gives_the_policy_s_numbers_and_follows_it_only_at_sync(tiny_model: Path) -> None:
    policy = Policy(tiny_model, ModelConfig(device="cpu"), OptimConfig(lr=1e-2))
    copy = FeatureModel(policy)
    seqs, positions = [[5, 6, 7, 8, 9], [10, 11, 12]], [[0, 4], [2]]
    for a, b in zip(policy.hidden_at(seqs, positions), copy.hidden_at(seqs, positions), strict=True):
        assert torch.equal(a, b)
    before = copy.hidden_at(seqs, positions)
    policy.sft_update([[5, 6, 7, 8, 9]], [[0, 1, 1, 1, 1]])  # a real optimizer step changes the policy's weights
    moved = policy.hidden_at(seqs, positions)
    assert not torch.equal(moved[0], before[0]), "the update must change the features for this test to mean much"
    assert all(torch.equal(a, b) for a, b in zip(copy.hidden_at(seqs, positions), before, strict=True)), "frozen"
    copy.sync()
    for a, b in zip(moved, copy.hidden_at(seqs, positions), strict=True):
        assert torch.equal(a, b)


async def test_collection_predicts_with_the_snapshot_of_the_last_publish(tiny_model: Path) -> None:
    """A refit of the live predictor (update, torch thread) never changes what collection predicts until publish."""
    cfg = TrainConfig()
    cfg.run.max_staleness, cfg.model.device = 1, "cpu"
    trace = TraceStep(cfg, Policy(tiny_model, cfg.model, cfg.optim), runner=None, n_train=1000)  # type: ignore[arg-type]
    await trace.publish()
    assert trace.features is not None and trace.served is None
    x = [[0.1 * i, 1.0 - 0.1 * i, float(i % 2)] for i in range(8)]
    assert await trace.apredict(x, 0.25) == [0.25] * 8, "nothing fit yet: the base rate"
    trace.predictor, trace.fitted = SuccessPredictor(3, seed=0), True
    trace.predictor.fit(torch.tensor(x), torch.tensor([1.0, 0.0] * 4), epochs=5)
    assert await trace.apredict(x, 0.25) == [0.25] * 8, "fit but not published"
    await trace.publish()
    served = await trace.apredict(x, 0.25)
    trace.predictor.fit(torch.tensor(x), torch.tensor([0.0, 1.0] * 4), epochs=50)
    assert await trace.apredict(x, 0.25) == served
    await trace.publish()
    assert await trace.apredict(x, 0.25) != served


# ---------------------------------------------------------------------------------------------- the real loop
SMALL = DEBUG_SMALL


@pytest.mark.slow
def test_next_step_generates_while_this_step_trains(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACE_CACHE_DIR", str(cache_dir))
    out = tmp_path / "run"
    sets = [*SMALL, f'run.output_dir="{out}"', "run.steps=3", "run.max_staleness=1", "run.eval_every=0"]
    sets += ["run.save_every=0", "run.save_trees=true"]
    asyncio.run(train(load_train_config(REPO / "configs" / "debug.toml", sets)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for prev, r in itertools.pairwise(rows):
        # Step t+1's collection interval overlaps step t's update, measured from the loop's own timestamps...
        assert r["collect_start"] < prev["update_end"] and r["collect_end"] > prev["update_start"], (prev, r)
        assert r["overlap_s"] > 0, r
        # ...and its featurisation and prediction never queued behind that update (they did for its whole length).
        assert r["collect_wait_s"] < 0.25 * prev["update_s"], (r["collect_wait_s"], prev["update_s"])
    # Generation really ran on the old weights during the update: step t+1 has nodes of version t.
    _, trees = read_dump(out / "trees" / "step_00001.jsonl.gz")
    versions = [n["weight_version"] for t in trees for n in t["nodes"][1:]]
    assert 0 in versions, f"no node of step 1 was generated before step 0's push: {sorted(set(versions))}"
    for r in rows:
        assert r["stale_samples"] == 0 and r["samples"] > 0, r  # staleness <= 1 = max_staleness: nothing dropped
        assert r["push_s"] > 0 and r["sync_s"] >= r["push_s"], r
    summary = {k: [round(r[k], 3) for r in rows] for k in ("rollout_s", "update_s", "sync_s", "push_s", "overlap_s")}
    print("overlap timings:", summary, "collect_wait_s:", [round(r["collect_wait_s"], 4) for r in rows])


def test_predictor_features_skip_the_full_vocabulary_logits(tiny_model: Path) -> None:
    """Issue 13: the predictor's features ran the whole causal LM with output_hidden_states and no logits_to_keep,
    so the LM head produced full-vocabulary logits for every token of the batch (tens of GB at 8B). Now the head
    sees one position per row, and the features are exactly the full forward's last hidden states."""
    policy = Policy(tiny_model, ModelConfig(device="cpu"), OptimConfig())
    seqs = [[5, 20, 31, 44, 52, 60], [7, 8, 9]]
    positions = [[1, 5], [0, 2]]
    rows: list[int] = []
    head = policy.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, inp, _out: rows.append(inp[0].shape[1]))
    try:
        got = policy.hidden_at(seqs, positions)
    finally:
        hook.remove()
    assert rows == [1], f"the LM head ran on {rows} positions per row"
    with torch.no_grad():
        for seq, pos, h in zip(seqs, positions, got, strict=True):
            full = policy.model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]
            torch.testing.assert_close(h, full[pos].float(), rtol=1e-5, atol=1e-5)


def test_weights_for_the_engines_are_written_in_the_save_dtype(tiny_model: Path, tmp_path: Path) -> None:
    """Issue 13: the policy was saved in float32 whatever the model's own dtype (32 GB a step at 8B), and SGLang's
    dtype=auto then served a float32 config in float16. Now the engines' copy is written in model.save_dtype
    (auto: the dtype the model was stored in), the float32 master is untouched, and a launched SGLang server is
    told that dtype."""
    import json

    from safetensors import safe_open

    from trainer.learner.policy import save_dtype
    from trainer.services import dtype_args

    assert save_dtype("auto", tiny_model) == torch.float32  # the tiny model is stored in float32
    with pytest.raises(ValueError, match="save_dtype"):
        save_dtype("fp8", tiny_model)
    policy = Policy(tiny_model, ModelConfig(device="cpu", save_dtype="bfloat16"), OptimConfig())
    out = policy.save(tmp_path / "v1")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(policy.model.parameters()).dtype == torch.float32, "the master weights stay float32"
    assert save_dtype("auto", out) == torch.bfloat16, "a bf16 checkpoint's auto is bf16"
    reread = Policy(out, ModelConfig(device="cpu"), OptimConfig())
    for (name, a), b in zip(policy.model.named_parameters(), reread.model.parameters(), strict=True):
        torch.testing.assert_close(b, a.detach().to(torch.bfloat16).float(), msg=name)
    assert dtype_args(out, []) == ["--dtype", "bfloat16"]
    assert dtype_args(out, ["--dtype", "float16"]) == [] and dtype_args(out, ["--dtype=half"]) == []
    assert dtype_args(tiny_model, []) == ["--dtype", "float32"]
    # Issue 23: streamed in buckets of model.weight_bucket_mb, one file a bucket with save_pretrained's index, into
    # the same folder: the single file of the save before is removed, and the folder loads as the same weights.
    policy.bucket_bytes = 1 << 20
    again = policy.save(out)
    files = sorted(f.name for f in again.glob("*.safetensors"))
    assert len(files) == len(policy.weight_plan()) > 2 and "model.safetensors" not in files, files
    index = json.loads((again / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    sharded = Policy(again, ModelConfig(device="cpu"), OptimConfig())
    for (name, a), b in zip(reread.model.named_parameters(), sharded.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_kl_reference_in_bf16_keeps_rope_buffers_in_float32(tiny_model: Path) -> None:
    """Issue 13 (memory plan): the bf16 KL reference was made with `.to(bfloat16)`, which also cast RoPE's inv_freq
    buffer, so its logprobs drifted from the policy's with position (0.0024 -> 0.0106 mean |logprob| gap at
    positions 2000-4000 on the tiny model). Only its parameters are cast now. In a child process: accelerate keeps
    one mixed-precision setting per process."""
    code = (
        "import sys, torch; from trainer.learner.policy import Policy; from trainer.learner.config import ModelConfig, OptimConfig;"
        f"p = Policy({str(tiny_model)!r}, ModelConfig(device='cpu', mixed_precision='bf16'), OptimConfig(kl_coef=0.1));"
        "ps = {t.dtype for t in p.ref_model.parameters()};"
        "bs = {n: t.dtype for n, t in p.ref_model.named_buffers() if 'inv_freq' in n};"
        "print(ps, bs); sys.exit(0 if ps == {torch.bfloat16} and bs and set(bs.values()) == {torch.float32} else 1)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]

"""Training on several ranks (trainer/learner/distributed.py): rank 0 leads, the others join the policy's collective calls.

The equivalence tests launch this file itself under torchrun (gloo on CPU, the code path NCCL takes on GPUs) as
1 and as 2 ranks: both runs make the same calls on the same fixed batch — an RL update, an SFT update, the optimizer
state gathered and restored, a second RL update, the engines' weights gathered, prefix features — and the
2-rank results must equal the 1-rank ones. They train in float64 (`model.dtype`), so "equal" can be tight on any
CPU: in float32 the order of a reduction alone (one CPU's SIMD width, gloo's sum order) moved the parameters by
~2e-5 against an Adam step of ~1e-3 (issue 20). The batch is uneven on purpose (`LENGTHS`, micro-batches of 2):
token-balanced, rank 0 gets the one long sample (1 micro-batch) and rank 1 the six short ones (3), so rank 0 runs
two zero-weight micro-batches to join the gradient syncs, in the RL and in the SFT update; the worker counts them.
Under DDP and under FSDP2 (accelerate's own FSDP2 preparation, switched on over gloo by ACCELERATE_USE_FSDP=true
as `accelerate launch` would), and the worker records, at every forward of the updates, what accelerate's state
says (is_fsdp2, the distributed type) and the model's own gradient-sync flag (DDP's require_backward_grad_sync,
FSDP2's reduce_grads): under DDP sync off for every micro-batch but the last, as on a GPU; under FSDP2 a
reduce-scatter at every micro-batch (issue 21), and the gradient bytes the rank holds between micro-batches are
its shard's, with no unsharded gradient kept.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_torchrun_fsdp2_environment_is_the_shipped_accelerate_config() -> None:
    """FSDP2_ENV (what tests, benches and tools/gpu_check.py launch ranks with) says what configs/accelerate/fsdp2.yaml
    says: FSDP2, transformer-layer wrapping (without it accelerate wraps nothing)."""
    import yaml

    from trainer.learner.distributed import FSDP2_ENV

    fsdp = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp2.yaml").read_text())["fsdp_config"]
    assert FSDP2_ENV["ACCELERATE_USE_FSDP"] == "true"
    assert FSDP2_ENV["FSDP_VERSION"] == str(fsdp["fsdp_version"]) == "2"
    assert FSDP2_ENV["FSDP_AUTO_WRAP_POLICY"] == fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_token_shares_balance_tokens_and_cover_every_item_once() -> None:
    from trainer.learner.distributed import micro_batches, token_shares

    lengths = [50, 10, 10, 10, 10, 10, 40, 5]
    shares = token_shares(lengths, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= max(lengths), loads
    assert loads == [75, 70]  # 50 | 40, then the 10s to whichever holds fewer tokens, 5 last
    for s in shares:
        assert [lengths[i] for i in s] == sorted(lengths[i] for i in s), "ascending within a share"
    assert token_shares([3], 2) == [[0], []], "a rank may get nothing (it then runs blank micro-batches)"
    assert token_shares([], 3) == [[], [], []]
    assert [micro_batches(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]


def test_token_budget_micro_batches_bound_padded_tokens_and_match_counts_across_ranks() -> None:
    """Issue 21: micro-batches by a padded-token budget (rows x longest <= budget, at most `rows` rows), every item
    once, a too-long item alone; every rank runs the plan's count (the most any rank has)."""
    from trainer.learner.distributed import micro_batch_plan, pack_micro_batches

    lengths = [900, 100, 120, 130, 400, 410, 2000, 50, 60, 70, 80, 300]
    share = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = pack_micro_batches(lengths, share, rows=64, tokens=1000)
    assert [i for b in batches for i in b] == share, "in order, each item once"
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= 1000 or len(b) == 1, (b, padded)
    assert [len(b) for b in batches] == [7, 2, 1, 1, 1], batches  # 50..130 (7 x 130), 300 + 400, 410, 900, 2000
    assert [lengths[i] for i in batches[-1]] == [2000], "longer than the budget: alone"
    assert pack_micro_batches(lengths, share, rows=3) == [share[k : k + 3] for k in range(0, len(share), 3)]
    assert pack_micro_batches(lengths, share, rows=2, tokens=1000)[0] == share[:2], "both limits hold"
    assert pack_micro_batches(lengths, [], rows=4, tokens=10) == []
    plan, n_mb = micro_batch_plan(lengths, 2, rows=64, tokens=1000)
    assert sorted(i for p in plan for b in p for i in b) == list(range(len(lengths)))
    assert n_mb == max(len(p) for p in plan) and n_mb >= 2
    assert micro_batch_plan([], 3, rows=4, tokens=100) == ([[], [], []], 0)


def test_engines_get_gpus_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13: launched SGLang servers all landed on GPU 0, beside the training ranks. engine.gpus gives each
    server its slice (its CUDA_VISIBLE_DEVICES) and GPUs a training rank uses are refused."""
    from trainer.config import TrainConfig, load_train_config
    from trainer.services import engine_gpus, training_gpus

    assert engine_gpus([6, 7], 2, list(range(6))) == [[6], [7]]
    assert engine_gpus([4, 5, 6, 7], 2, [0, 1, 2, 3]) == [[4, 5], [6, 7]]
    assert engine_gpus([], 3, [0]) == []
    with pytest.raises(ValueError, match=r"includes GPUs \[5\] that training ranks use"):
        engine_gpus([5, 6], 2, list(range(6)))
    with pytest.raises(ValueError, match="split evenly"):
        load_train_config(sets=["engine.gpus=[6, 7, 8]", "engine.num_servers=2"])
    cfg = TrainConfig()
    cfg.model.device = "cuda"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert training_gpus(cfg) == [4, 5], "ranks take the first visible devices, one each"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert training_gpus(cfg) == [0, 1]
    cfg.model.device = "cpu"
    assert training_gpus(cfg) == []


def test_a_launched_cuda_engine_never_lands_on_a_training_gpu_by_accident(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 20: with no engine.gpus, a launched SGLang inherited the trainer's devices and started on GPU 0 beside
    rank 0, and nothing refused it. Now refused at start (cli, exit 2) unless engine.colocate; attached engines and
    a CPU engine are not placed; engine.colocate lets engine.gpus name a training GPU too."""
    from trainer.cli import main
    from trainer.config import TrainConfig, load_train_config
    from trainer.services import check_engine_placement, launches_cuda_engines

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cfg = TrainConfig()
    cfg.model.device, cfg.engine.type = "cuda", "sglang"
    with pytest.raises(ValueError, match=r"engine.gpus is empty.*start on GPU 0, beside training rank 0"):
        check_engine_placement(cfg)
    cfg.engine.colocate = True
    assert check_engine_placement(cfg) == [], "colocated: the server sees the trainer's devices"
    cfg.engine.gpus = [0]
    assert check_engine_placement(cfg) == [[0]], "colocate allows a training GPU"
    cfg.engine.colocate = False
    with pytest.raises(ValueError, match=r"includes GPUs \[0\] that training ranks use"):
        check_engine_placement(cfg)
    cfg.engine.gpus = [1]
    assert check_engine_placement(cfg) == [[1]]
    cfg.engine.gpus, cfg.engine.type = [], "cpu"
    assert not launches_cuda_engines(cfg) and check_engine_placement(cfg) == [], "our engine on its CPU default"
    cfg.engine.extra_args = ["--device", "cuda:0"]
    assert launches_cuda_engines(cfg)
    with pytest.raises(ValueError, match=r"engine\.gpus is empty"):
        check_engine_placement(cfg)
    cfg.engine.extra_args, cfg.engine.urls, cfg.engine.type = [], ["http://127.0.0.1:1"], "url"
    assert check_engine_placement(cfg) == [], "attached engines are not ours to place"
    with pytest.raises(ValueError, match=r"engine\.colocate places engines this run launches"):
        load_train_config(sets=["engine.colocate=true", 'engine.urls=["http://127.0.0.1:1"]'])
    # The command refuses it before any rank starts or anything is built (exit 2, the reason on stderr).
    argv = ["--engine", "sglang", "--model.device", "cuda", "--output-dir", "/nonexistent/never-made"]
    assert main(argv) == 2
    assert "engine.gpus is empty" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_shipped_accelerate_configs_load_and_leave_the_engines_their_gpus(name: str) -> None:
    """configs/accelerate/{ddp,fsdp2}.yaml are accelerate's own config files: its loader reads them, and the GPUs
    they train on and the GPUs the shipped Qwen3 config gives its engines (engine.gpus, no --set needed) are
    disjoint, one GPU a server; the placement check passes for that layout on the node it assumes."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from trainer.config import load_train_config
    from trainer.services import engine_gpus

    c = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert c.distributed_type == (DistributedType.FSDP if name == "fsdp2" else DistributedType.MULTI_GPU)
    if name == "fsdp2":
        assert c.fsdp_config["fsdp_version"] == 2 and c.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    training = [int(g) for g in c.gpu_ids.split(",")]
    assert len(training) == c.num_processes
    cfg = load_train_config(REPO / "configs" / "qwen3-8b-hotpotqa.toml")
    assert engine_gpus(cfg.engine.gpus, cfg.engine.num_servers, training) == [[6], [7]]
    assert not cfg.engine.colocate and not set(cfg.engine.gpus) & set(training)
    assert cfg.engine.num_servers == 2, "two servers for six ranks"
    args = cfg.engine.extra_args
    assert 0.85 <= float(args[args.index("--mem-fraction-static") + 1]) <= 0.9, "a GPU of its own: most of it"
    from trainer.services import check_engine_placement

    with pytest.MonkeyPatch.context() as mp:  # on the node it assumes: LOCAL_WORLD_SIZE ranks on all 8 devices
        mp.setenv("LOCAL_WORLD_SIZE", str(c.num_processes))
        mp.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(8))))
        assert check_engine_placement(cfg) == [[6], [7]]


def test_fsdp_plugin_reduces_in_float32_and_followers_start_empty(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path
) -> None:
    """Issue 21: accelerate's bf16 policy reduce-scatters in bf16; the trainer's plugin reduces in float32 and loads
    the checkpoint on rank 0 only. A follower's model is built with no parameter storage (the meta device), its
    rotary buffers real and its LM head still tied, as accelerate's loading from rank 0 needs them."""
    import torch

    from trainer.learner.policy import _build_model, fsdp_plugin

    monkeypatch.delenv("FSDP_VERSION", raising=False)
    plugin = fsdp_plugin("bf16")
    assert plugin.fsdp_version == 2 and plugin.cpu_ram_efficient_loading
    mp = plugin.mixed_precision_policy
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp_plugin("no").mixed_precision_policy is None, "full precision: nothing cast, reduced in its dtype"
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP2 only"):
        fsdp_plugin("bf16")
    empty = _build_model(tiny_model, torch.float64, empty=True)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in empty.parameters())
    assert all(b.device.type == "cpu" for b in empty.buffers())
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    full = _build_model(tiny_model, torch.float64, empty=False)
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in full.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(empty.buffers(), full.buffers(), strict=True))


def _launch(
    nproc: int, out: Path, model: Path, *, fsdp: bool = False, resume: Path | None = None, packed: bool = False
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRACE_TEST_PACKED": "1" if packed else ""}
    env.pop("WORLD_SIZE", None)
    if fsdp:
        from trainer.learner.distributed import FSDP2_ENV

        env.update(FSDP2_ENV)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [__file__, str(out), str(model), *([str(resume)] if resume is not None else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _all_closed(out, nproc), "every rank destroyed its process groups at the end"


def test_closing_the_ranks_twice_or_stopping_after_is_a_no_op() -> None:
    """One process, no group: a second close and a stop after close raise nothing and leave the ranks closed (with
    followers and groups: test_two_ranks_exit_cleanly_at_stop)."""
    from trainer.learner.distributed import Ranks

    ranks = Ranks()
    ranks.close()
    ranks.close()
    ranks.stop()
    assert ranks.closed and ranks.group is None


def test_two_ranks_exit_cleanly_at_stop(tmp_path: Path) -> None:
    """Ranks.stop (rank 0) and follow (the others) destroy the process groups before the process exits. Left to the
    interpreter's teardown, gloo's threads made a rank abort after a clean run ("terminate called without an active
    exception"): 2 of 8 launches of this start-and-stop on 2 ranks before the fix, and a CI run of the resume test
    below; 0 of 8 after. Launched 3 times: every launch exits 0 with every rank closed."""
    for k in range(3):
        out = tmp_path / str(k) / "out"
        out.parent.mkdir()
        _launch(2, out, Path("-"))


@pytest.fixture(scope="module")
def packed_one_rank(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    import torch

    out = tmp_path_factory.mktemp("packed-one-rank") / "result.pt"
    _launch(1, out, tiny_model, packed=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_prefix_shared_updates_on_two_ranks_take_the_one_rank_gradient(
    fsdp: bool, packed_one_rank: dict, tmp_path: Path, tiny_model: Path
) -> None:
    """optim.share_prefixes on 2 ranks (DDP, FSDP2): the plan (packed_plan, computed here as the ranks compute it)
    gives rank 0 one prompt's run and rank 1 two, and rank 0 runs a blank micro-batch to join rank 1's second
    (recorded by the ranks); the update takes the gradient
    (AdamW's first moment, by parameter name, float64) of the packed update on 1 rank to 1e-9 of the gradient's size,
    and that of the unpacked one to float32 rounding (Qwen3RMSNorm); the loss and its metrics alike."""
    import torch
    from test_packing import _samples

    from trainer.learner.packing import packed_plan

    _launch(2, tmp_path / "result.pt", tiny_model, fsdp=fsdp, packed=True)
    two = torch.load(tmp_path / "result.pt", weights_only=False)
    one = packed_one_rank
    assert (one["world_size"], two["world_size"]) == (1, 2) and two[True]["sharded"] is fsdp
    samples = _samples(5)
    seqs, groups = [s.input_ids for s in samples], [s.prompt_id for s in samples]
    plan, n_mb = packed_plan(seqs, groups, 2, 6)
    # 3 prompts' runs of 4 (4 + 4 > 6): the longest alone on rank 0, two on rank 1; rank 0 then runs a blank one
    assert [len(p) for p in plan] == [1, 2] and n_mb == 2, plan
    assert two[True]["blanks"] == [False, True], "rank 0: its run, then a blank micro-batch to join the sync"
    assert one[True]["blanks"] == [False, False, False]

    def gap(a: dict, b: dict) -> float:
        assert a.keys() == b.keys() and len(a) > 10
        return max(float((a[k] - b[k]).abs().max()) for k in a) / max(float(v.abs().max()) for v in a.values())

    plain, packed1, packed2 = one[False]["grad"], one[True]["grad"], two[True]["grad"]
    # The same rows on either side (each micro-batch holds one run): equal to float64 rounding; against the unpacked
    # update to float32 rounding (test_packing.py says why).
    assert gap(packed1, packed2) <= 1e-9 and gap(plain, packed2) <= 1e-5, (gap(packed1, packed2), gap(plain, packed2))
    for key, v in one[True]["metrics"].items():
        assert two[True]["metrics"][key] == pytest.approx(v, rel=1e-6, abs=1e-9), key
    print(f"\n[{'fsdp2' if fsdp else 'ddp'}] packed on 2 ranks vs 1: {gap(packed1, packed2):.3g} of the gradient")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    import torch

    out = tmp_path_factory.mktemp("one-rank") / "result.pt"
    _launch(1, out, tiny_model)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def fsdp_two_ranks(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[dict, Path]:
    """The worker on 2 FSDP2 ranks: its results and its folder (the sharded checkpoint is its `state/`)."""
    import torch

    out = tmp_path_factory.mktemp("fsdp-two-ranks") / "result.pt"
    _launch(2, out, tiny_model, fsdp=True)
    return torch.load(out, weights_only=False), out.parent


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_rank_updates_equal_the_one_rank_updates(
    fsdp: bool, one_rank: dict, tmp_path: Path, tiny_model: Path, request: pytest.FixtureRequest
) -> None:
    """Issue 13: one update on 2 ranks (token-balanced shares, zero-weight padding, losses scaled to sum the
    ranks' gradients) gives the parameters of the 1-rank update on the same batch; so do the SFT update, an
    optimizer state gathered to rank 0 and restored, the weights gathered for the engines (bf16, tied tensors
    kept tied) and, under FSDP2, the prefix features computed as a collective. Issue 20: in float64, with a bound
    relative to how far the update moved the parameters, and the GPU's branches taken (checked during the update).
    Run with `-s` to see the differences it measured."""
    import torch

    from trainer.learner.distributed import balanced_shares

    if fsdp:
        two, _ = request.getfixturevalue("fsdp_two_ranks")
    else:
        _launch(2, tmp_path / "result.pt", tiny_model)
        two = torch.load(tmp_path / "result.pt", weights_only=False)
    one = one_rank
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["sharded"] is fsdp and one["sharded"] is False
    # The zero-weight branch: the shares this batch gets, and the blank micro-batches rank 0 really ran.
    shares, n_mb = balanced_shares(LENGTHS, 2, MICRO_BATCH)
    assert [len(s) for s in shares] == [1, 6] and n_mb == 3, shares
    for stage in ("rl", "sft", "rl2"):
        calls = two["forwards"][stage]
        assert [c["blank"] for c in calls] == [False, True, True], (stage, calls)
        assert not any(c["blank"] for c in one["forwards"][stage])
        # What a GPU run's accelerate state says, during the update and not only after the set-up.
        assert all(c["is_fsdp2"] is fsdp for c in calls), (stage, calls)
        assert all(c["distributed_type"] == ("FSDP" if fsdp else "MULTI_CPU") for c in calls), (stage, calls)
        if fsdp:  # issue 21: a reduce-scatter at every micro-batch, so only the shard is held in between
            assert [c["sync"] for c in calls] == [True, True, True], f"{stage}: FSDP2 syncs every micro-batch"
        else:
            assert [c["sync"] for c in calls] == [False, False, True], f"{stage}: sync only at the last micro-batch"
        assert all(c["unsharded_grad_bytes"] == 0 for c in calls), (stage, calls)
        held = [c["grad_bytes"] for c in calls]
        full = two["full_bytes"]
        assert held[0] == 0 and held[1:] == [two["shard_bytes"]] * 2, (stage, held, two["shard_bytes"], full)
        if fsdp:
            assert full / 2 <= two["shard_bytes"] < full * 0.6, "a rank holds half the gradient, not all of it"
    measured = []
    for stage in ("rl", "sft", "rl2"):
        m1, m2 = one[f"{stage}_metrics"], two[f"{stage}_metrics"]
        for key in m1:
            assert m2[key] == pytest.approx(m1[key], rel=1e-9, abs=1e-12), (stage, key, m1[key], m2[key])
        p1, p2 = one[f"{stage}_params"], two[f"{stage}_params"]
        assert p1.keys() == p2.keys() and all(t.dtype == torch.float64 for t in p1.values())
        moved = max(float((p1[k] - one["start"][k]).abs().max()) for k in p1)
        assert moved > 1e-4, f"{stage}: the update moved nothing, the comparison would be empty"
        diff = max(float((p1[k] - p2[k]).abs().max()) for k in p1)
        gap = max(abs(m2[k] - m1[k]) / max(abs(m1[k]), 1e-300) for k in m1)
        measured.append(f"{stage}: |2-rank - 1-rank| max {diff:.3g}, the update moved {moved:.3g} (ratio "
                        f"{diff / moved:.3g}); metrics' largest relative gap {gap:.3g}")  # fmt: skip
        assert diff <= 1e-9 * moved, f"{stage}: 2-rank parameters differ from 1-rank by {diff} (moved {moved})"
    w1, w2 = one["engine_weights"], two["engine_weights"]
    assert w1.keys() == w2.keys()
    assert all(w2[k].dtype == torch.bfloat16 for k in w2)
    bf16 = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    assert bf16 <= 1e-2  # the bf16 rounding of equal values: a tie may round either way
    assert two["tied"], "a tied lm_head is left out of the engines' weights: they tie it from the embedding"
    hidden = max(
        float((h1 - h2).abs().max() / h1.abs().max()) for h1, h2 in zip(one["hidden"], two["hidden"], strict=True)
    )
    assert hidden < 1e-6, "features on 2 ranks equal those on 1 (float32 features of a float64 model)"
    assert one["feature_rows_rank0"] == 5 and 1 <= two["feature_rows_rank0"] < 5, "spread over the ranks, DDP too"
    signals = max(
        float((h1[:, -2:] - h2[:, -2:]).abs().max() / h1[:, -2:].abs().max())
        for h1, h2 in zip(one["hidden"], two["hidden"], strict=True)
    )
    assert signals < 1e-6, "the LM head's signals (inside the FSDP2-sharded head) on 2 ranks equal those on 1"
    assert all(bool((h[:, -2] < 0).all() and (h[:, -1] > 0).all()) for h in two["hidden"]), "log p < 0, entropy > 0"
    assert two["saved_config"]["dtype"] == "bfloat16"
    assert two["saved"].keys() == one["saved"].keys()
    assert all(torch.equal(two["saved"][k], w2[k]) for k in two["saved"]), "rank 0 wrote the gathered weights"
    # Streamed in 1 MB buckets (model.weight_bucket_mb): one safetensors file a bucket, named by the index.
    assert len(two["saved_files"]) > 2 and two["saved_files"] == one["saved_files"]
    assert set(two["saved_index"]) == set(two["saved"]) and set(two["saved_index"].values()) == set(two["saved_files"])
    # The feature copy: the policy's own weights on one rank or DDP; under FSDP2 the last save's (bf16).
    feature = max(
        float((h1 - h2).norm() / h1.norm()) for h1, h2 in zip(one["feature_hidden"], two["feature_hidden"], strict=True)
    )
    assert feature < (0.02 if fsdp else 1e-6)
    measured.append(f"engine weights (bf16) {bf16:.3g}; prefix features {hidden:.3g} (signals {signals:.3g}); "
                    f"feature copy {feature:.3g}")  # fmt: skip
    held = two["forwards"]["rl"][1]["grad_bytes"]
    measured.append(f"gradient bytes rank 0 holds between micro-batches: {held:,} of the model's {two['full_bytes']:,}")
    print(f"\n[{'fsdp2' if fsdp else 'ddp'}] 2 ranks vs 1, float64:\n  " + "\n  ".join(measured))


@pytest.mark.parametrize("nproc", [1, 2], ids=["on-1-rank", "on-2-ranks"])
def test_a_sharded_checkpoint_resumes_on_one_and_on_two_ranks(
    nproc: int, fsdp_two_ranks: tuple[dict, Path], tmp_path: Path, tiny_model: Path
) -> None:
    """Issue 23: `Policy.save_state` on 2 FSDP2 ranks (each rank writes its own shards: float32 master weights and
    AdamW state) resumes on 1 rank and on 2 with the same next update as the run that wrote it (float64: to 1e-9 of
    how far that update moved the parameters), so master weights and optimizer state both came back exactly."""
    import torch

    saver, folder = fsdp_two_ranks
    _launch(nproc, tmp_path / "resumed.pt", tiny_model, fsdp=nproc == 2, resume=folder / "state")
    got = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert got["world_size"] == nproc
    before, after = saver["rl2_params"], saver["rl3_params"]
    assert max(float((got["loaded"][k] - before[k]).abs().max()) for k in before) == 0.0, "the master weights"
    moved = max(float((after[k] - before[k]).abs().max()) for k in after)
    gap = max(float((got["rl3_params"][k] - after[k]).abs().max()) for k in after)
    assert moved > 1e-4 and gap <= 1e-9 * moved, (gap, moved)
    assert got["rl3_metrics"]["loss"] == pytest.approx(saver["rl3_metrics"]["loss"], rel=1e-9)
    print(f"\nresumed on {nproc} rank(s): next update within {gap:.3g} of the writer's (it moved {moved:.3g})")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_debug_config_on_two_ranks_runs_end_to_end_and_resumes(tmp_path: Path, cache_dir: Path) -> None:
    """Issue 13: `torchrun --nproc-per-node 2 -m trainer.cli --config configs/debug.toml` (gloo) runs end to end with
    exactly one env server and one engine (rank 0's), every metrics row carrying world_size; the SFT warm start and
    the RL updates run on both ranks, checkpoints write the sharded training state, and `--resume` on 2 ranks restores it
    and continues."""
    from test_train_smoke import SMALL

    out = tmp_path / "run"
    env = {**os.environ, "TRACE_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trainer.cli"]
    base += ["--config", str(REPO / "configs" / "debug.toml"), "--output-dir", str(out)]
    base += [x for s in SMALL for x in ("--set", s)]
    # The resumed part sends weights over a process group (gloo) instead of disk: step 3's samples must come from
    # weight version 3, which only that push gives the engine (max_staleness 0 would drop older ones).
    for steps, extra in ((2, []), (4, ["--resume", "--engine.weight-sync", "group"])):
        proc = subprocess.run([*base, "--steps", str(steps), *extra], env=env, capture_output=True, text=True,
                              timeout=900, cwd=REPO)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(r["world_size"] == 2 for r in rows)
    assert all(r["trained_tokens"] > 0 and r["leaves"] == rows[0]["leaves"] > 0 for r in rows)
    assert all(r["stale_samples"] == 0 for r in rows), "every push reached the engine"
    assert rows[3]["weight_version"] == 4
    logs = sorted(p.name for p in out.glob("*.log"))
    assert logs == ["engine_0.log", "env_server.log"], f"one env server and one engine for both ranks: {logs}"
    # Issue 23: the checkpoint's training state is sharded (torch.distributed.checkpoint), keyed by parameter name
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(out / "checkpoints" / "step_00004" / "state")).read_metadata().state_dict_metadata
    assert any(k.startswith("optim.state.") and k.endswith(".exp_avg") for k in keys), sorted(keys)[:5]
    assert (
        any(k.startswith("model.") for k in keys) and not (out / "checkpoints" / "step_00004" / "optimizer.pt").exists()
    )


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=False)


# ------------------------------------------------------------------------------------------ the torchrun worker
LENGTHS = [100, 9, 14, 22, 6, 17, 12]
"""One long sample and six short ones: token-balanced over 2 ranks, 1 and 6 samples, 1 and 3 micro-batches."""
MICRO_BATCH = 2


def _samples() -> list:
    from trainer.learner.samples import TrainSample

    rng = random.Random(0)
    out = []
    for k, n in enumerate(LENGTHS):
        ids = [rng.randrange(5, 200) for _ in range(n)]
        mask = [0] * 3 + [1] * (n - 3)
        adv = [0.0] * 3 + [rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 1.0)] * (n - 3)
        w = [0.0] * 3 + [rng.choice([1.0, 0.5])] * (n - 3)
        eng = [0.0] * 3 + [-rng.uniform(2.0, 6.0) for _ in range(n - 3)]
        out.append(TrainSample(ids, mask, adv, w, eng, prompt_id=f"p{k}", tree_index=k, leaf_id=k))
    return out


def _watch_forwards(policy: Any, pad_id: int) -> dict[str, list[dict]]:
    """Record, at each forward of the policy's model while a stage is named in the returned dict's "_stage" slot,
    what a GPU run would branch on: accelerate's state (read anew, as its optimizer and properties read it), the
    model's own gradient-sync flag (DDP: require_backward_grad_sync; FSDP2: its param group's reduce_grads; None on
    one rank), and whether the micro-batch is a blank one (a single row of two pad tokens)."""
    from accelerate.state import AcceleratorState

    seen: dict[str, Any] = {"_stage": None}

    def grads() -> tuple[int, int]:
        """Bytes of gradient this rank holds: its parameters' .grad (under FSDP2 its shards, DTensors' local part),
        and the whole unsharded gradients FSDP2 keeps on its gathered parameters (held there when a backward does
        not reduce-scatter)."""
        own = 0
        for p in policy.model.parameters():
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                own += g.numel() * g.element_size()
        unsharded = 0
        for m in policy.model.modules():
            group = m._get_fsdp_state()._fsdp_param_group if hasattr(m, "_get_fsdp_state") else None
            for fp in group.fsdp_params if group is not None else []:
                g = getattr(getattr(fp, "_unsharded_param", None), "grad", None)
                unsharded += 0 if g is None else g.numel() * g.element_size()
        return own, unsharded

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        stage = seen["_stage"]
        if stage is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        own, unsharded = grads()
        if hasattr(module, "require_backward_grad_sync"):
            sync = bool(module.require_backward_grad_sync)
        elif hasattr(module, "_get_fsdp_state"):  # every sharded submodule's param group holds the flag
            groups = [m._get_fsdp_state()._fsdp_param_group for m in module.modules() if hasattr(m, "_get_fsdp_state")]
            flags = {bool(g.reduce_grads) for g in groups if g is not None}
            assert len(flags) == 1, f"the param groups disagree on syncing: {flags}"
            sync = flags.pop()
        else:
            sync = None
        seen.setdefault(stage, []).append(
            {
                "is_fsdp2": bool(policy.accelerator.is_fsdp2),
                "distributed_type": str(AcceleratorState().distributed_type.value),
                "sync": sync,
                "blank": tuple(ids.shape) == (1, 2) and bool((ids == pad_id).all()),
                "grad_bytes": own,  # held between micro-batches: measured before this one's forward
                "unsharded_grad_bytes": unsharded,
            }
        )

    policy.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _first_moments(policy: Any) -> dict[str, Any]:
    """AdamW's first moment of every parameter after one step (the step's gradient x 0.1), float64, by name."""
    state = policy.optimizer_state()
    inner = policy.accelerator.unwrap_model(policy.model)
    names = [n for n, _ in inner.named_parameters()]
    out = {}
    for key, st in state["state"].items():
        name = names[key] if isinstance(key, int) else key.removeprefix("module.")
        out[name] = st["exp_avg"].double().cpu()
    return out


def _packed_worker(out: str, model: str) -> None:
    """Prefix-shared updates (TRACE_TEST_PACKED): on tree-shaped samples (tests/test_packing.py's), one RL update
    unpacked and one packed on 1 rank, one packed on 2; the gradient each took, the metrics, which micro-batches
    rank 0 ran blank."""
    import torch

    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.distributed import Ranks, follow
    from trainer.learner.policy import Policy

    ranks = Ranks.start(cpu=True)
    if not ranks.leader:
        follow(ranks)
        _closed(out, ranks.rank)
        return
    sys.path.insert(0, str(REPO / "tests"))
    from test_packing import _samples

    res: dict[Any, Any] = {"world_size": ranks.size}
    for share in (False, True) if ranks.size == 1 else (True,):
        ocfg = OptimConfig(lr=1e-3, micro_batch_size=6, kl_coef=0.0, share_prefixes=share)
        policy = Policy(model, ModelConfig(device="cpu", dtype="float64"), ocfg, seed=0)
        forwards = _watch_forwards(policy, policy.pad_id)
        forwards["_stage"] = "rl"
        metrics = policy.rl_update(_samples(5))
        forwards["_stage"] = None
        res[share] = {
            "metrics": metrics,
            "grad": _first_moments(policy),
            "blanks": [c["blank"] for c in forwards["rl"]],
            "sharded": policy.sharded,
        }
    ranks.stop()
    _closed(out, ranks.rank)
    torch.save(res, out)


def _worker(out: str, model: str, resume: str | None = None) -> None:
    import torch
    from safetensors.torch import load_file

    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.distributed import Ranks, follow
    from trainer.learner.policy import FeatureModel, Policy

    ranks = Ranks.start(cpu=True)
    if not ranks.leader:
        follow(ranks)
        _closed(out, ranks.rank)
        return
    if model == "-":  # only start and stop the ranks
        ranks.stop()
        _closed(out, ranks.rank)
        return
    torch.manual_seed(0)
    ocfg = OptimConfig(lr=1e-3, micro_batch_size=MICRO_BATCH, kl_coef=0.0, clip_eps_high=None)
    mcfg = ModelConfig(device="cpu", save_dtype="bfloat16", dtype="float64", weight_bucket_mb=1)  # streams: buckets
    policy = Policy(model, mcfg, ocfg, seed=0)
    forwards = _watch_forwards(policy, policy.pad_id)

    def params() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in (policy.engine_weights(torch.float64) or {}).items()}

    samples = _samples()
    if resume is not None:  # issue 23: the sharded checkpoint of another run, then that run's next update
        policy.load_state(resume)
        res = {"world_size": ranks.size, "sharded": policy.sharded, "loaded": params()}
        res["rl3_metrics"] = policy.rl_update(samples)
        res["rl3_params"] = params()
        ranks.stop()
        _closed(out, ranks.rank)
        torch.save(res, out)
        return
    res: dict = {"world_size": ranks.size, "sharded": policy.sharded, "start": params()}
    local = [p.to_local() if hasattr(p, "to_local") else p for p in policy.model.parameters()]
    res["shard_bytes"] = sum(t.numel() * t.element_size() for t in local)  # this rank's share of the parameters
    res["full_bytes"] = sum(p.numel() * p.element_size() for p in policy.model.parameters())
    forwards["_stage"] = "rl"
    res["rl_metrics"] = policy.rl_update(samples)
    forwards["_stage"] = None
    res["rl_params"] = params()
    ids = [s.input_ids for s in samples]
    forwards["_stage"] = "sft"
    res["sft_metrics"] = {"loss": policy.sft_update(ids, [[1.0] * len(x) for x in ids], MICRO_BATCH)}
    forwards["_stage"] = None
    res["sft_params"] = params()
    policy.load_optimizer_state(policy.optimizer_state())
    forwards["_stage"] = "rl2"
    res["rl2_metrics"] = policy.rl_update(samples)
    forwards["_stage"] = None
    res["rl2_params"] = params()
    res["forwards"] = {k: v for k, v in forwards.items() if k != "_stage"}
    policy.save_state(Path(out).parent / "state")  # the sharded checkpoint (issue 23), then the next update
    res["rl3_metrics"] = policy.rl_update(samples)
    res["rl3_params"] = params()
    weights = policy.engine_weights()
    assert weights is not None
    res["engine_weights"] = weights
    res["tied"] = "lm_head.weight" not in weights  # left out for the engines, which tie it from the embedding
    stream = policy.weight_stream()  # a push that fails after its first bucket: closing the stream still runs the
    next(stream)  # remaining gathers on rank 0, so the followers are in step for the calls below (else they hang)
    stream.close()
    positions = [[0, len(x) - 1] for x in ids[:5]]
    rows: list[int] = []  # the feature rows rank 0 itself runs: on several ranks only its share (issue 23)
    inner = policy.accelerator.unwrap_model(policy.model)
    count = inner.register_forward_pre_hook(lambda _m, _a, kw: rows.append(len(kw["input_ids"])), with_kwargs=True)
    res["hidden"] = policy.hidden_at(ids[:5], positions, batch=2, signals=(5, 1.0))  # + predictor.policy_signals
    count.remove()
    res["feature_rows_rank0"] = sum(rows)
    saved = policy.save(Path(out).parent / "weights")
    res["saved_config"] = json.loads((saved / "config.json").read_text())
    res["saved_files"] = sorted(f.name for f in saved.glob("*.safetensors"))
    res["saved"] = {k: v.clone() for f in saved.glob("*.safetensors") for k, v in load_file(f).items()}
    res["saved_index"] = json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"]
    res["feature_hidden"] = FeatureModel(policy).hidden_at(ids[:5], positions, batch=2, signals=(5, 1.0))
    ranks.stop()
    _closed(out, ranks.rank)
    torch.save(res, out)


def _closed(out: str, rank: int) -> None:
    """Record beside `out` whether this rank left no process group behind (`closed-rank{rank}`)."""
    import torch.distributed as dist

    Path(out).with_name(f"closed-rank{rank}").write_text(json.dumps(not dist.is_initialized()))


def _all_closed(out: Path, nproc: int) -> bool:
    return all(json.loads((out.parent / f"closed-rank{r}").read_text()) for r in range(nproc))


if __name__ == "__main__":
    if os.environ.get("TRACE_TEST_PACKED"):
        _packed_worker(*sys.argv[1:3])
    else:
        _worker(*sys.argv[1:4])

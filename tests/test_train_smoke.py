"""The whole loop on the debug config: a real env server and a real CPU engine as child processes, the
tiny model built and SFT-warm-started, TRACE steps through accelerate, metrics, checkpoints, resume."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEBUG_SMALL

from tools.tiny_model import build_tiny_model
from trainer import loop
from trainer.checkpoint import reference_of
from trainer.cli import main as train_main
from trainer.config import ModelConfig, OptimConfig, TrainConfig, load_train_config
from trainer.dumps import read_dump
from trainer.learner.policy import Policy
from trainer.loop import train

REPO = Path(__file__).resolve().parents[1]
REQUIRED = (
    "step",
    "reward_mean",
    "effective_ratio",
    "nonzero_adv_token_frac",
    "leaves",
    "generated_tokens",
    "prefill_tokens",
    "cached_prefill_tokens",
    "predictor_brier",
    "predictor_auc",
    "step_time_s",
    "env_calls",
)
SMALL = [*DEBUG_SMALL, "run.eval_size=4", "run.save_trees=true", "optim.kl_coef=0.1"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_debug_config_runs_resumes_and_continues(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACE_CACHE_DIR", str(cache_dir))
    out = tmp_path / "run"
    # max_staleness=1: step 1's rollouts run while step 0 trains, and its weight push pauses them mid-flight.
    sets = [*SMALL, f'run.output_dir="{out}"', "run.steps=2", "run.max_staleness=1", 'run.report_to=["tensorboard"]']
    sets.append("predictor.probe_prompts=2")  # issue 22's calibration probe, outside the leaf budget
    cfg = load_train_config(REPO / "configs" / "debug.toml", sets)
    asyncio.run(train(cfg))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, f"metrics row lacks {missing}"
        assert r["leaves"] > 0 and r["generated_tokens"] > 0
        assert 0 < r["cached_prefill_tokens"] <= r["prefill_tokens"], "branches re-send prefixes the cache serves"
        assert 0.0 <= r["effective_ratio"] <= 1.0
        # The probe: 2 prompts, a rollout from each root and one from a turn of it (none when the first turn
        # ended it), beside the step's own leaves, which stay exactly the budget.
        assert 2 <= r["probe_leaves"] <= 4 and r["probe_n"] == r["probe_leaves"], r
        assert r["leaves"] == r["leaf_budget"], r
    assert "eval_em" in rows[-1] and "train_em" in rows[-1] and "eval_em_before" in rows[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # run.report_to

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("leaves")] == [(r["step"], r["leaves"]) for r in rows]
    assert [e.step for e in events.Tensors("samples/text_summary")] == [0, 1], "run.tracker_samples' trajectories"
    assert all(r["tree_dump_bytes"] > 0 and r["tree_dump_s"] > 0 for r in rows), "what each step's dump cost"
    trees = [t for f in sorted((out / "trees").glob("step_*.jsonl.gz")) for t in read_dump(f)[1]]
    assert trees and {t["prompt_id"] for t in trees} <= {f"train-{i:06d}" for i in range(5)}, "env.train_limit=5"
    assert (out / "checkpoints" / "step_00002" / "model" / "config.json").exists()
    assert (out / "checkpoints" / "step_00002" / "state" / ".metadata").exists(), "the sharded training state"
    assert any(cache_dir.glob("sft-*/model.safetensors")), "the SFT warm start is cached"

    # Resume through the command line: continues at step 2, keeps the first rows as they were.
    code = train_main(["--config", str(REPO / "configs" / "debug.toml"), "--steps", "3", "--output-dir", str(out),
                       "--resume", *[x for s in [*SMALL, "predictor.probe_prompts=2", "run.keep_checkpoints=1"]
                                     for x in ("--set", s)]])  # fmt: skip
    assert code == 0
    again = _rows(out)
    assert [r["step"] for r in again] == [0, 1, 2]
    assert again[:2] == rows
    # The probe's pairs so far are in the checkpoint: the resumed run's probe_n counts on from them.
    state = torch.load(out / "checkpoints" / "step_00003" / "trainer.pt", weights_only=False)
    assert len(state["trace"]["probe"]["pairs"]) == sum(r["probe_n"] for r in again)
    assert again[2]["weight_version"] == 3
    # run.keep_checkpoints=1: the resumed run's checkpoint is complete, so the one it resumed from is gone
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00003"]
    # The KL reference of the resumed run is still the weights the run started from (the cached SFT model).
    state = torch.load(out / "checkpoints" / "step_00003" / "trainer.pt", weights_only=False)
    assert Path(state["reference_model"]).parent == cache_dir and "sft-" in Path(state["reference_model"]).name


@pytest.mark.slow
def test_the_debug_config_trains_with_prefix_shared_updates(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """optim.share_prefixes in the real loop (TRACE trees, the KL reference, rollouts overlapping the update): both
    steps train (tokens trained, finite losses), and the packed micro-batches ran fewer tokens than their
    sequences hold."""
    from trainer.learner import packing

    monkeypatch.setenv("TRACE_CACHE_DIR", str(cache_dir))
    out = tmp_path / "run"
    sets = [*SMALL, f'run.output_dir="{out}"', "run.steps=2", "run.max_staleness=1", "optim.share_prefixes=true"]
    packed: list[tuple[int, int]] = []  # (tokens run, tokens the sequences hold) of each packed micro-batch
    real = packing.pack_prefixes

    def counting(seqs, groups=None):  # type: ignore[no-untyped-def]
        p = real(seqs, groups)
        packed.append((p.padded, sum(len(s) for s in seqs)))
        return p

    monkeypatch.setattr(packing, "pack_prefixes", counting)
    monkeypatch.setattr("trainer.learner.policy.pack_prefixes", counting)
    asyncio.run(train(load_train_config(REPO / "configs" / "debug.toml", sets)))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["loss"]) and r["trained_tokens"] > 0 for r in rows), rows
    assert packed and sum(u for u, _ in packed) < sum(t for _, t in packed), packed


def test_kl_reference_is_the_starting_weights_on_resume(tiny_model: Path, tmp_path: Path) -> None:
    """A resumed policy (loaded from a checkpoint) keeps its KL term on the weights the run started from."""
    ckpt = build_tiny_model(tmp_path / "ckpt", seed=1)  # stands in for trained weights: every tensor differs
    mcfg, ocfg = ModelConfig(device="cpu"), OptimConfig(kl_coef=0.1)
    resumed = Policy(ckpt, mcfg, ocfg, reference=tiny_model)
    fresh = Policy(ckpt, mcfg, ocfg)
    start = Policy(tiny_model, mcfg, ocfg).model.state_dict()
    assert resumed.reference == str(tiny_model) and fresh.reference == str(ckpt)
    for name, value in resumed.ref_model.state_dict().items():
        assert torch.equal(value, start[name]), name
    emb = "model.embed_tokens.weight"
    assert not torch.equal(fresh.ref_model.state_dict()[emb], start[emb]), "the fixture's two models must differ"

    # Resuming reads the reference from the checkpoint, and says so when it is gone.
    torch.save({"reference_model": str(tmp_path / "gone")}, tmp_path / "trainer.pt")
    cfg = load_train_config(None, ["optim.kl_coef=0.1"])
    with pytest.raises(FileNotFoundError, match="KL reference"):
        reference_of(tmp_path, cfg)
    cfg.optim.kl_coef = 0.0
    assert reference_of(tmp_path, cfg) == str(tmp_path / "gone")
    torch.save({"next_step": 3}, tmp_path / "trainer.pt")  # a checkpoint older than the record
    with pytest.raises(FileNotFoundError, match="not recorded"):
        reference_of(tmp_path, load_train_config(None, ["optim.kl_coef=0.1"]))


def test_bad_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--set", "allocation.type=nope"]) == 2
    assert "unknown allocator 'nope'" in capsys.readouterr().err
    assert train_main(["--set", "run.nosuchfield=1"]) == 2
    assert "no field 'nosuchfield'" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[runn]\nsteps = 1\n")
    assert train_main(["--config", str(bad)]) == 2
    assert "unknown key 'runn'" in capsys.readouterr().err


def test_resume_without_checkpoint_fails_loudly(tmp_path: Path) -> None:
    cfg = load_train_config(REPO / "configs" / "debug.toml", [f'run.output_dir="{tmp_path}"'])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        asyncio.run(train(cfg, resume=True))


def test_overrides_are_typed_and_unquoted() -> None:
    """Regression: `--name x` once produced a run folder literally named '"x"'."""
    from trainer.cli import parse

    cfg = parse(["--name", "x", "--steps", "3", "--set", "optim.lr=1", "--allocator", "uniform"]).cfg
    assert (cfg.run.name, cfg.run.steps, cfg.optim.lr, cfg.allocation.type) == ("x", 3, 1.0, "uniform")
    assert isinstance(cfg.optim.lr, float)
    with pytest.raises(ValueError, match="Expected `int`"):
        load_train_config(None, ["run.steps=abc"])


def test_sft_schedule_warms_up_holds_then_decays_to_zero() -> None:
    from trainer.sft import sft_lr

    s = load_train_config(None, ["sft.lr=0.01", "sft.warmup_steps=10", "sft.decay_frac=0.2"]).sft
    lrs = [sft_lr(k, 100, s) for k in range(100)]
    assert lrs[0] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.01)
    assert lrs[10:80] == [pytest.approx(0.01)] * 70, "constant between warmup and decay"
    assert all(a > b for a, b in itertools.pairwise(lrs[80:])) and lrs[99] == pytest.approx(0.01 / 20)
    with pytest.raises(ValueError, match="decay_frac"):
        load_train_config(None, ["sft.decay_frac=1.5"])


def test_plot_metrics_draws_the_rows(tmp_path: Path) -> None:
    from trainer.plots import plot_metrics

    rows = [
        {"step": 0, "reward_mean": 0.3, "effective_ratio": 0.5, "train_em_before": 0.4, "eval_em_before": 0.2},
        {
            "step": 1,
            "reward_mean": 0.4,
            "effective_ratio": 0.6,
            "train_em": 0.5,
            "eval_em": 0.25,
            "predictor_auc": None,
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    [png] = plot_metrics(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_em_is_drawn_against_cumulative_leaves() -> None:
    """metrics.png's last panel: EM against the sampling cost, the evaluation before training at 0 leaves."""
    from trainer.plots import em_vs_leaves

    rows = [
        {"step": 0, "leaves": 64, "eval_em_before": 0.2},
        {"step": 1, "leaves": 64, "eval_em": 0.25, "train_em": 0.5},
        {"step": 2, "leaves": 64},
        {"step": 3, "leaves": 64, "eval_em": 0.3, "eval_early": 0.1},
    ]
    assert em_vs_leaves(rows) == {
        "eval_em": [(0, 0.2), (128, 0.25), (256, 0.3)],
        "train_em": [(128, 0.5)],
        "eval_early": [(256, 0.1)],
    }


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_train_config(path)
    assert cfg.run.steps >= 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_stops_every_child_process(tmp_path: Path, cache_dir: Path, sig: signal.Signals) -> None:
    """Ctrl-C (or SIGTERM) mid-run: the trainer exits promptly and leaves no env server or engine behind."""
    env = {**os.environ, "TRACE_CACHE_DIR": str(cache_dir)}
    cmd = [sys.executable, "-m", "trainer.cli", "--config", str(REPO / "configs" / "debug.toml"), "--steps", "50",
           "--output-dir", str(tmp_path / "run"), *[x for s in SMALL for x in ("--set", s)]]  # fmt: skip
    # a shell's background job starts with SIGINT ignored; a terminal's foreground job does not
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "no training step within 400 s"
        time.sleep(1)
    children = _children(proc.pid)
    assert children, "the trainer runs its env server and engine as child processes"
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the trainer did not exit within 90 s of the signal") from None
    assert code != 0
    time.sleep(1)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)]
    assert not alive, f"child processes left running: {alive}"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_a_model_of_ones_own_is_told_which_demo_values_it_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    logs: list[dict] = []

    class Recorder:  # structlog may already be configured with cached loggers by other tests
        def warning(self, event: str, **kw: object) -> None:
            logs.append({"event": event, **kw})

    monkeypatch.setattr(loop, "log", Recorder())
    loop._warn_demo_defaults(load_train_config(REPO / "configs" / "qwen3-8b-hotpotqa.toml"))
    loop._warn_demo_defaults(load_train_config(None, ['model.path="/models/Qwen3-8B"', "optim.lr=1e-6"]))
    assert logs == [], "the shipped real-run config, and a run that sets its own rate, keep no demo value"
    loop._warn_demo_defaults(load_train_config(None, ['model.path="/models/Qwen3-8B"', "optim.kl_coef=0.1"]))
    assert len(logs) == 1 and logs[0]["optim.lr"] == TrainConfig().optim.lr, logs
    assert "optim.kl_coef" not in logs[0] and "env.train_limit" not in logs[0], "0 (the demo's) is no demo value"


def test_a_fresh_run_sets_an_earlier_runs_metrics_and_checkpoints_aside(tmp_path: Path) -> None:
    """Defect found running the comparison bench: a fresh run in the folder of an earlier one appended its rows to
    the old metrics.jsonl (the bench read both runs' evaluations as one curve), and a later --resume could pick the
    old run's checkpoint."""
    from trainer.checkpoint import latest_checkpoint, set_aside_previous_run

    assert set_aside_previous_run(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "checkpoints" / "step_00030").mkdir(parents=True)
    first = set_aside_previous_run(tmp_path)
    assert first == tmp_path / "previous-1" and (first / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert not (tmp_path / "checkpoints").exists() and (first / "checkpoints" / "step_00030").is_dir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        latest_checkpoint(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n')
    assert set_aside_previous_run(tmp_path) == tmp_path / "previous-2", "nothing is overwritten"
    assert (first / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_bad_input_is_exit_2_with_what_to_fix_and_a_failed_start_moves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """From a user-side audit: an env URL that answers nothing ended in three chained tracebacks (exit 1), after the
    earlier run's metrics and checkpoints had been moved aside, so the `--resume` that followed found nothing and
    did not say where they were; a model folder that is not one failed after the env server started; a URL without
    its scheme, an unknown log level, a file as the output folder were tracebacks. Now each is exit 2 and one line
    naming what to fix, found before anything starts where the config can tell, and nothing moves until the run's
    services are up."""
    import socket

    debug = ["--config", str(REPO / "configs" / "debug.toml")]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00010").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    t0 = time.perf_counter()
    assert train_main([*debug, "--output-dir", str(out), "--env-url", nowhere]) == 2
    err = capsys.readouterr().err
    assert f"the env server at {nowhere} answered nothing" in err and "Traceback" not in err, err
    assert time.perf_counter() - t0 < 60
    assert (out / "metrics.jsonl").exists() and (out / "checkpoints" / "step_00010").is_dir()
    assert not (out / "previous-1").exists() and not (out / "config.json").exists(), "a failed start moved nothing"
    (out / "previous-1").mkdir()
    (out / "checkpoints").rename(out / "previous-1" / "checkpoints")  # as a fresh run's start would have
    assert train_main([*debug, "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint under" in err and "previous-1" in err, err
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "a-model").mkdir()
    (tmp_path / "a-model" / "config.json").write_text("{}")
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--model", str(tmp_path / "missing")], "no such folder"),
        (["--model", str(tmp_path / "not-a-model")], "holds no config.json"),
        (["eval", "--model", str(tmp_path / "missing")], "no such folder"),
        (["eval", "--model", str(tmp_path / "a-model"), "--limit", "0"], "--limit must be >= 1"),
        (["--engine-url", "localhost:30000"], "must start with http:// or https://"),
        (["--env-url", "localhost:8000"], "must start with http:// or https://"),
        (["--log-level", "verbose"], "run.log_level must be one of"),
        (["--log-level", "warn", "--model", str(tmp_path / "missing")], "no such folder"),  # warn is a level
        (["--output-dir", str(tmp_path / "a-file")], "is a file"),
        (["--allocation.m-min", "40"], "allocation.m_min (40) and m_max"),
        (["--allocation.rounds", "0"], "allocation.rounds (0) must be >= 1"),
    ]
    for argv, needle in cases:
        assert train_main(argv[:1] + debug + argv[1:] if argv[0] == "eval" else [*debug, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)


def test_what_cannot_run_on_several_ranks_is_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_model: Path
) -> None:
    """Several ranks train (tests/test_distributed.py); what cannot is refused up front with what to change, before
    any process group or service starts: `trace-train eval` (one process), and a KL reference under FSDP."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_main(["eval", "--model", str(tiny_model)]) == 2
    assert "runs in one process" in capsys.readouterr().err
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert train_main(["--config", str(REPO / "configs" / "debug.toml"), "--optim.kl-coef", "0.1"]) == 2
    assert "optim.kl_coef=0.1 under FSDP" in capsys.readouterr().err


async def test_an_env_server_that_cannot_serve_the_run_is_refused_before_the_warm_start(
    make_env_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--env-url to a server whose turn cap is below env.max_turns (every create would answer 422), or that lacks
    the run's split: a ValueError saying what to change, before the warm start spends minutes."""
    server = await make_env_server(max_turns=2)
    warm = []
    monkeypatch.setattr(loop, "_initial_policy", lambda *a, **k: warm.append(1))  # must not be reached
    base = ["run.eval_every=1", f'run.output_dir="{tmp_path / "run"}"', f'env.urls=["{server.url}"]']
    with pytest.raises(ValueError, match=r"env\.max_turns 4 is past the env server.s cap of 2 turns"):
        await train(load_train_config(REPO / "configs" / "debug.toml", [*base, "env.max_turns=4"]))
    with pytest.raises(ValueError, match="no synthetic/nope"):
        await train(
            load_train_config(REPO / "configs" / "debug.toml", [*base, "env.max_turns=2", 'env.eval_split="nope"'])
        )
    assert warm == []

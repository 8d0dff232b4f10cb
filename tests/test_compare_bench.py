"""bench/compare_allocators.py's equal-cost bookkeeping, on hand-made metrics rows (the runs themselves are a
benchmark, not a test): leaves per step must be equal, and the dev-EM curve is built on cumulative leaves."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # the script imports its sibling simulate_allocation, as when run from bench/
_spec = importlib.util.spec_from_file_location("compare_allocators", BENCH / "compare_allocators.py")
cmp = importlib.util.module_from_spec(_spec)
sys.modules["compare_allocators"] = cmp  # --jobs' workers find its functions by name, as when the script runs
_spec.loader.exec_module(cmp)  # type: ignore[union-attr]


def _rows(ems: dict[int, float], before: float, leaves: int = 64, steps: int = 4) -> list[dict]:
    rows = [{"step": s, "leaves": leaves, **({"eval_em": ems[s]} if s in ems else {})} for s in range(steps)]
    rows[0]["eval_em_before"] = before
    return rows


def test_curve_is_on_cumulative_leaves_and_unequal_leaves_fail() -> None:
    got = cmp.dev_em_curve(_rows({1: 0.2, 3: 0.3}, before=0.1))
    assert got == {"leaves_per_step": 64, "dev_em_curve": [[0, 0.1], [128, 0.2], [256, 0.3]]}
    bad = _rows({3: 0.3}, before=0.1)
    bad[2]["leaves"] = 63
    with pytest.raises(AssertionError, match="unequal leaves per step"):
        cmp.dev_em_curve(bad)


def test_summary_has_the_final_em_interval_and_the_mean_curve() -> None:
    figures = dict.fromkeys(cmp.FIGURES, 0.0)
    runs = []
    for seed, final in enumerate((0.2, 0.3, 0.4)):
        run = {**figures, "allocator": "trace", "seed": seed, "dev_em": final, "wall_s": 1.0}
        runs.append({**run, **cmp.dev_em_curve(_rows({3: final}, before=0.1))})
    s = cmp.summarise(runs, ["trace"])["trace"]
    assert s["leaves_per_step"] == 64 and s["seeds"] == 3
    assert s["dev_em_final"] == pytest.approx(0.3)
    assert s["dev_em_final_ci95"] == pytest.approx(4.303 * 0.1 / 3**0.5, rel=1e-3)  # t(2) * sd / sqrt(n)
    assert s["dev_em_curve"] == [[0, pytest.approx(0.1)], [256, pytest.approx(0.3)]]
    other = [{**runs[0], "allocator": "uniform", "leaves_per_step": 32}]
    with pytest.raises(AssertionError, match="different leaves per step"):
        cmp.summarise([*runs, *other], ["trace", "uniform"])


def test_goals_against_grpo_come_from_the_mean_curves() -> None:
    """effective_ratio_vs_grpo, and the leaves each allocator needs to reach GRPO's final dev EM (None: never)."""
    figures = dict.fromkeys(cmp.FIGURES, 0.0)
    runs = []
    for a, ems, ratio in (
        ("uniform", {1: 0.2, 3: 0.4}, 0.3),
        ("trace", {1: 0.4, 3: 0.5}, 0.6),
        ("root-only", {3: 0.3}, 0.3),
    ):
        for seed in range(2):
            run = {**figures, "effective_ratio": ratio, "allocator": a, "seed": seed, "dev_em": ems[3], "wall_s": 1.0}
            runs.append({**run, **cmp.dev_em_curve(_rows(ems, before=0.1))})
    s = cmp.summarise(runs, ["uniform", "trace", "root-only"])
    assert s["trace"]["effective_ratio_vs_grpo"] == pytest.approx(2.0)
    assert s["uniform"]["leaves_to_grpo_final"] == 256 and s["uniform"]["leaves_to_grpo_final_frac"] == 1.0
    assert s["trace"]["leaves_to_grpo_final"] == 128 and s["trace"]["leaves_to_grpo_final_frac"] == 0.5
    assert s["root-only"]["leaves_to_grpo_final"] is None
    # GRPO never above its start (issue 12's 95% run): everyone "reaches" it at 0 leaves, fraction 0, not nan.
    flat = [{**r, "dev_em_curve": [[0, 0.4], [128, 0.4]], "dev_em": 0.4} for r in runs]
    assert cmp.summarise(flat, ["uniform", "trace"])["trace"]["leaves_to_grpo_final_frac"] == 0.0
    assert "| root-only |" in cmp.table(s) and "n/a" in cmp.table(s)
    # Issue 22: GRPO with no mixed prompt (effective ratio 0, as on the debug config) crashed the summary.
    unmixed = [{**r, "effective_ratio": 0.0} if r["allocator"] == "uniform" else r for r in runs]
    ratios = cmp.summarise(unmixed, ["uniform", "trace"])
    assert math.isnan(ratios["trace"]["effective_ratio_vs_grpo"]) and math.isnan(
        ratios["uniform"]["effective_ratio_vs_grpo"]
    )
    assert "| trace |" in cmp.table(ratios)


def test_a_finished_comparison_is_summarised_again_from_its_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    figures = dict.fromkeys(cmp.FIGURES, 0.0)
    runs = []
    for a, ems in (("uniform", {1: 0.2, 3: 0.4}), ("trace", {1: 0.4, 3: 0.5}), ("trace-fixed", {1: 0.3, 3: 0.4})):
        for seed in range(2):
            run = {**figures, "effective_ratio": 0.5, "allocator": a, "seed": seed, "dev_em": ems[3], "wall_s": 1.0}
            runs.append({**run, **cmp.dev_em_curve(_rows(ems, before=0.1))})
    del runs[0]["prompts_skipped"]  # a runs.json from before a figure existed still summarises
    saved = tmp_path / "c.runs.json"
    saved.write_text(json.dumps({"steps": 4, "seeds": 2, "runs": runs}))
    out = tmp_path / "again.json"
    assert cmp.main(["--from-runs", str(saved), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    # every arm of the runs, --arm variants included, in the order they ran
    assert list(summary) == ["uniform", "trace", "trace-fixed"] and summary["trace"]["leaves_to_grpo_final"] == 128
    assert out.with_suffix(".dev_em.png").exists() and "| trace-fixed |" in out.with_suffix(".md").read_text()
    assert cmp.main(["--from-runs", str(saved), "--out", str(out), "--allocators", "uniform,trace"]) == 0
    assert list(json.loads(out.read_text())) == ["uniform", "trace"]
    with pytest.raises(SystemExit):  # a usage error naming the arm the runs lack
        cmp.main(["--from-runs", str(saved), "--out", str(out), "--allocators", "uniform,entropy"])
    assert "--allocators names ['entropy']" in capsys.readouterr().err


def test_equal_care_figures_are_paired_by_seed_and_arms_parse() -> None:
    """Issue 22: the mean dev EM over each run's evaluations, its paired difference against GRPO's on the same seed
    with a t interval, each arm's rate, gradient norm and clip rate; --arm NAME=ALLOCATOR|SET|... variants."""
    figures = dict.fromkeys(cmp.FIGURES, 0.0)
    runs = []
    for seed, (g, t) in enumerate(((0.30, 0.33), (0.40, 0.42), (0.20, 0.24))):
        for a, em in (("uniform", g), ("trace-fixed", t)):
            run = {**figures, "allocator": a, "seed": seed, "dev_em": em, "wall_s": 1.0, "lr": 5e-5}
            run |= {"grad_norm": 0.5, "clip_rate": 0.25, **cmp.dev_em_curve(_rows({1: em, 3: em}, before=0.1))}
            run["dev_em_mean"] = em
            runs.append(run)
    s = cmp.summarise(runs, ["uniform", "trace-fixed"])
    assert s["trace-fixed"]["vs_grpo_dev_em_mean"] == pytest.approx(0.03)
    assert s["trace-fixed"]["vs_grpo_dev_em_mean_ci95"] == pytest.approx(4.303 * 0.01 / 3**0.5, rel=1e-3)
    assert s["uniform"]["vs_grpo_dev_em_mean"] == 0.0
    assert s["trace-fixed"]["vs_grpo_dev_em_final"] == pytest.approx(0.03)  # the last evaluation's, paired
    assert s["uniform"]["vs_grpo_dev_em_final"] == 0.0
    assert s["trace-fixed"]["lr"] == 5e-5 and s["trace-fixed"]["clip_rate"] == 0.25
    assert "| trace-fixed |" in cmp.table(s) and "5e-05" in cmp.table(s)
    assert cmp.parse_arm('trace-fixed=trace|allocation.stage2_share="unmixed"|advantage.process_baseline="fresh"') == (
        "trace-fixed",
        "trace",
        ['allocation.stage2_share="unmixed"', 'advantage.process_baseline="fresh"'],
    )
    with pytest.raises(ValueError, match="expected NAME=ALLOCATOR"):
        cmp.parse_arm("trace-fixed")


# A tuning sweep where the two figures disagree: 5e-5 ends highest, 2e-4 starts fastest (mean over the run); for
# "trace" 1e-4 and 5e-5 end level (a tie goes to the lower rate).
TUNING = {
    ("uniform", 5e-5): (0.40, 0.56),
    ("uniform", 1e-4): (0.45, 0.55),
    ("uniform", 2e-4): (0.50, 0.52),
    ("trace", 5e-5): (0.42, 0.55),
    ("trace", 1e-4): (0.48, 0.55),
    ("trace", 2e-4): (0.47, 0.50),
}


def _tuning_run(arm: str, lr: float, seed: int) -> dict:
    mean, final = TUNING[(arm, lr)]
    d = 0.01 if seed % 2 else -0.01  # two seeds around each figure
    return {"allocator": f"{arm}-lr{lr:g}", "lr": lr, "seed": seed, "dev_em_mean": mean + d, "dev_em": final - d}


def test_tuning_on_either_figure_and_what_each_would_pick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--tune-on picks each arm's rate by the tuning runs' mean dev EM (the protocol's) or their final one, and
    writes which to sweep.json; a summary from finished runs (--from-runs) reports the rate either figure picks, from
    the tuning runs in the comparison's work folder (FILE.tuning.json)."""
    import argparse

    def fake_run_one(config, sets, alloc, seed, steps, out, eval_every, arm, keep=None):  # runs: a benchmark
        name, lr = arm.rsplit("-lr", 1)
        return _tuning_run(name, float(lr), seed)

    monkeypatch.setattr(cmp, "run_one", fake_run_one)
    arms = {"uniform": ("uniform", []), "trace": ("trace", [])}
    picked = {}
    for on in ("mean", "final"):
        args = argparse.Namespace(sweep_lrs="5e-5,1e-4,2e-4", tune_on=on, tune_seeds=2, set=[], config="c.toml",
                                  steps=4, eval_every=2)  # fmt: skip
        picked[on] = cmp.tune_rates(args, ["uniform", "trace"], arms, tmp_path)
        assert json.loads((tmp_path / "sweep.json").read_text())["tuned_on"] == on
    assert picked == {"mean": {"uniform": 2e-4, "trace": 1e-4}, "final": {"uniform": 5e-5, "trace": 5e-5}}

    work = tmp_path / "cmp"
    for (arm, lr), _ in TUNING.items():
        for seed in (10_000, 10_001):
            run_dir = work / "tune" / f"{arm}-lr{lr:g}-s{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "result.json").write_text(json.dumps({"key": {}, "result": _tuning_run(arm, lr, seed)}))
    # Left in the folder: another sweep's rate, and a failed attempt kept aside; neither is this comparison's.
    for stray in ("uniform-lr0.001-s10000", "uniform-lr5e-05-s10000.failed-1"):
        (work / "tune" / stray).mkdir()
        best = {**_tuning_run("uniform", 5e-5, 10_000), "lr": 1e-3 if "0.001" in stray else 5e-5, "dev_em_mean": 0.9}
        (work / "tune" / stray / "result.json").write_text(json.dumps({"key": {}, "result": {**best, "dev_em": 0.9}}))
    (work / "sweep.json").write_text(json.dumps({"scores": {"uniform": {"5e-05": 0, "0.0001": 0, "0.0002": 0}}}))
    sens = cmp.tuning_sensitivity(work / "tune", ["uniform", "trace"], [5e-5, 1e-4, 2e-4])
    assert {a: (s["rate_by_mean"], s["rate_by_final"]) for a, s in sens.items()} == {
        "uniform": (2e-4, 5e-5),
        "trace": (1e-4, 5e-5),
    }
    assert sens["uniform"]["rates"]["0.0002"] == {"mean": pytest.approx(0.50), "final": pytest.approx(0.52), "seeds": 2}
    assert cmp.tuning_sensitivity(tmp_path / "nowhere", ["uniform"]) == {}

    figures = dict.fromkeys(cmp.FIGURES, 0.0)
    runs = [
        {
            **figures,
            "allocator": a,
            "seed": seed,
            "dev_em": 0.5,
            "wall_s": 1.0,
            **cmp.dev_em_curve(_rows({3: 0.5}, 0.1)),
        }
        for seed in range(2)
        for a in ("uniform", "trace")
    ]
    saved = tmp_path / "cmp.runs.json"
    saved.write_text(json.dumps({"steps": 4, "seeds": 2, "runs": runs}))
    out = tmp_path / "again.json"
    assert cmp.main(["--from-runs", str(saved), "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".tuning.json").read_text()) == json.loads(json.dumps(sens))
    assert list(json.loads(out.read_text())) == ["uniform", "trace"], "the summary keeps only the arms"


def test_progress_counts_the_finished_runs_of_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--progress, given a comparison's own arguments, counts its planned tuning and reported runs that have a
    result.json (a folder without one is a run cut off part way) and estimates the time left at their median."""
    work = tmp_path / "cmp"
    for name, wall in (
        ("uniform-lr5e-05-s10000", 600),
        ("uniform-lr5e-05-s10001", 3000),
        ("trace-lr5e-05-s10000", 500),
    ):
        (work / "tune" / name).mkdir(parents=True)
        (work / "tune" / name / "result.json").write_text(json.dumps({"key": {}, "result": {"wall_s": wall}}))
    (work / "tune" / "uniform-lr0.0001-s10000").mkdir()  # cut off: no result.json
    (work / "uniform-s0").mkdir(parents=True)
    (work / "uniform-s0" / "result.json").write_text(json.dumps({"key": {}, "result": {"wall_s": 700}}))
    st = cmp.progress(work, ["uniform", "trace"], [5e-5, 1e-4], 2, 3)
    assert (st["tuning_done"], st["tuning_planned"], st["reported_done"], st["reported_planned"]) == (3, 8, 1, 6)
    assert st["median_run_s"] == 650 and st["hours_left"] == pytest.approx(10 * 650 / 3600)
    assert st["next"] == "uniform-lr0.0001-s10000"
    two = cmp.progress(work, ["uniform", "trace"], [5e-5, 1e-4], 2, 3, jobs=2)
    assert two["hours_left"] == pytest.approx(st["hours_left"] / 2), "--jobs 2: two runs at a time"
    kept = tmp_path / "kept" / "tune" / "uniform-lr0.0001-s10000"  # finished in another checkout, kept (--keep)
    kept.mkdir(parents=True)
    (kept / "result.json").write_text(json.dumps({"key": {}, "result": {"wall_s": 650}}))
    again = cmp.progress(work, ["uniform", "trace"], [5e-5, 1e-4], 2, 3, keep=tmp_path / "kept")
    assert again["tuning_done"] == 4 and again["next"] == "uniform-lr0.0001-s10001"
    argv = ["--out", str(tmp_path / "cmp.json"), "--allocators", "uniform,trace", "--seeds", "3"]
    assert cmp.main([*argv, "--sweep-lrs", "5e-5,1e-4", "--progress"]) == 0
    assert "tuning runs 3/8, reported runs 1/6; next uniform-lr0.0001-s10000; ~1.8 h left" in capsys.readouterr().out
    assert not (tmp_path / "cmp.json").exists(), "--progress runs and writes nothing"


def test_a_finished_run_is_kept_only_when_its_settings_are_the_same(tmp_path, monkeypatch) -> None:
    """A comparison stopped part way resumes: run_one keeps a run whose result.json has the same settings, and
    reruns (here: reaches train, which the test replaces) one whose settings differ."""
    config = str(Path(__file__).resolve().parents[1] / "configs" / "debug.toml")
    calls = []

    async def fake_train(cfg):  # only to see whether run_one would train; the real runs are a benchmark
        calls.append(cfg.optim.lr)
        raise RuntimeError("would train")

    monkeypatch.setattr(cmp, "train", fake_train)
    with pytest.raises(RuntimeError, match="would train"):
        cmp.run_one(config, ["optim.lr=0.001"], "uniform", 3, 2, tmp_path)
    run_dir = tmp_path / "uniform-s3"
    overrides = ["optim.lr=0.001", 'allocation.type="uniform"', "run.seed=3", "run.steps=2",
                 f'run.output_dir="{run_dir}"', "run.eval_every=2", "run.save_every=0", "run.plot=false"]  # fmt: skip
    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(
        json.dumps({"key": {"config": config, "overrides": overrides}, "result": {"dev_em": 0.25}})
    )
    assert cmp.run_one(config, ["optim.lr=0.001"], "uniform", 3, 2, tmp_path) == {"dev_em": 0.25}
    with pytest.raises(RuntimeError, match="would train"):
        cmp.run_one(config, ["optim.lr=0.002"], "uniform", 3, 2, tmp_path)
    assert calls == [0.001, 0.001, 0.002, 0.002], "a failed run is run once more, then the comparison stops"


def test_a_failed_run_is_run_once_more_and_its_logs_kept(tmp_path, monkeypatch) -> None:
    """Issue 22's comparison died when one run's engine call timed out: now a failure is retried once, the failed
    run's folder kept beside it, and only a second failure stops the comparison, naming both folders."""
    config = str(Path(__file__).resolve().parents[1] / "configs" / "debug.toml")
    attempts = []

    def fake_run(out: Path) -> None:  # the first attempt stalls, the second finishes one step
        out.mkdir(parents=True, exist_ok=True)
        attempts.append(out)
        if len(attempts) == 1:
            (out / "engine_0.log").write_text("stalled")
            raise TimeoutError("POST /generate timed out after 600s")
        (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "leaves": 12, "eval_em": 0.5, "eval_em_before": 0.1}))

    async def flaky_train(cfg):
        fake_run(Path(cfg.run.output_dir))

    monkeypatch.setattr(cmp, "train", flaky_train)
    res = cmp.run_one(config, [], "uniform", 1, 1, tmp_path)
    assert res["dev_em"] == 0.5 and len(attempts) == 2
    assert (tmp_path / "uniform-s1.failed-1" / "engine_0.log").read_text() == "stalled"
    assert (tmp_path / "uniform-s1" / "result.json").exists()

    async def broken_train(cfg):
        raise ValueError("a bug")

    monkeypatch.setattr(cmp, "train", broken_train)
    with pytest.raises(RuntimeError, match=r"uniform seed 2 failed twice \(ValueError: a bug\).*\.failed-1"):
        cmp.run_one(config, [], "uniform", 2, 1, tmp_path)


@pytest.mark.parametrize("script", ["run_equal_care.sh", "run_peers.sh"])
def test_the_long_comparisons_name_real_arms_and_settings(script: str) -> None:
    """The hours-long comparison scripts fail at their first command, not hours in: every --allocators entry is an
    allocator or one of the script's --arm names, and every --set and arm override loads on the compare config."""
    import re
    import shlex

    from trainer.algo.allocation import ALLOCATORS
    from trainer.config import load_train_config

    text = (BENCH / script).read_text().replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    calls = [line for line in text.splitlines() if "compare_allocators.py" in line and not line.startswith("#")]
    assert len(calls) == {"run_equal_care.sh": 3, "run_peers.sh": 2}[script], calls
    config = Path(__file__).resolve().parents[1] / "configs" / "compare.toml"
    for call in calls:
        for name, value in variables.items():
            value = shlex.split(value)[0] if value else ""
            call = call.replace(f'"${name}"', shlex.quote(value)).replace(f"${name}", value)
        argv = shlex.split(call)
        opt = {
            flag: [argv[i + 1] for i, a in enumerate(argv) if a == flag] for flag in ("--arm", "--set", "--allocators")
        }
        arms = {arm[0]: arm for arm in map(cmp.parse_arm, opt["--arm"])}
        sets = opt["--set"]
        for name in opt["--allocators"][0].split(","):
            allocator, extra = (arms[name][1], arms[name][2]) if name in arms else (name, [])
            assert allocator in ALLOCATORS, (script, name)
            cfg = load_train_config(config, [*sets, f'allocation.type="{allocator}"', *extra])
            assert cfg.allocation.type == allocator


def _meet(folder: str, me: str, other: str) -> dict:
    """A --jobs worker's call: leaves its mark, then waits (up to 300 s) for `other`'s: both return only when two
    calls run at once."""
    import os
    import time

    (Path(folder) / me).write_text(str(os.getpid()))
    deadline = time.monotonic() + 300  # the other worker may still be importing torch on busy cores
    while not (Path(folder) / other).exists():
        assert time.monotonic() < deadline, f"{me}: {other} never ran beside it"
        time.sleep(0.05)
    return {"me": me, "pid": os.getpid(), "threads": os.environ.get("OMP_NUM_THREADS"),
            "share": os.environ.get("TRACE_CPU_SHARE")}  # fmt: skip


def _mark_or_fail(folder: str, i: int, delay: float) -> dict:
    import time

    if i == 0:
        raise ValueError("run 0 failed twice")
    time.sleep(delay)
    (Path(folder) / f"ran-{i}").write_text("")
    return {"i": i}


def test_jobs_run_at_once_in_their_own_processes_and_a_failure_stops_the_rest(tmp_path: Path) -> None:
    """--jobs 2: two calls run at the same time (each waits for the other's mark: one at a time would time out),
    in two worker processes with cores // 2 threads each ($OMP_NUM_THREADS, which the CPU engine caps its threads
    at), and the results come back in the specs' order; a call that raises cancels the calls not yet started."""
    import os

    specs = [((str(tmp_path), "a", "b"), {}), ((str(tmp_path), "b", "a"), {})]
    got = cmp.run_many(specs, jobs=2, fn=_meet)
    assert [g["me"] for g in got] == ["a", "b"]
    assert len({g["pid"] for g in got} | {os.getpid()}) == 3, "each call in a worker process of its own"
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert {g["threads"] for g in got} == {g["share"] for g in got} == {share}
    assert cmp.run_many([((str(tmp_path), "c", "a"), {})], jobs=1, fn=_meet)[0]["pid"] == os.getpid()

    specs = [((str(tmp_path), i, 1.0), {}) for i in range(12)]
    with pytest.raises(ValueError, match="run 0 failed twice"):
        cmp.run_many(specs, jobs=2, fn=_mark_or_fail)
    assert len(list(tmp_path.glob("ran-*"))) < 11, "the calls not yet started when run 0 failed were cancelled"


def test_keep_copies_each_finished_run_and_a_new_checkout_resumes_from_it(tmp_path, monkeypatch) -> None:
    """--keep: a finished run's result.json is copied into the keep folder (under the run's name); a comparison
    whose work folder is gone (a new checkout, at the same path or another) restores it from there and keeps it when
    its settings are the same (the config's text, not its path), and reruns it when they differ."""
    config = str(Path(__file__).resolve().parents[1] / "configs" / "debug.toml")
    trained = []

    def write_one_step(out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "leaves": 12, "eval_em": 0.5, "eval_em_before": 0.1}))

    async def one_step(cfg):
        trained.append(cfg.optim.lr)
        write_one_step(Path(cfg.run.output_dir))

    monkeypatch.setattr(cmp, "train", one_step)
    work, keep = tmp_path / "runs" / "cmp" / "tune", tmp_path / "repo" / "kept" / "tune"
    first = json.dumps(cmp.run_one(config, ["optim.lr=0.001"], "uniform", 3, 1, work, keep=keep))  # NaN figures
    assert json.dumps(json.loads((keep / "uniform-s3" / "result.json").read_text())["result"]) == first
    import shutil

    shutil.rmtree(tmp_path / "runs")  # a new checkout: the work folder is gone, the keep folder (committed) is not
    assert json.dumps(cmp.run_one(config, ["optim.lr=0.001"], "uniform", 3, 1, work, keep=keep)) == first
    assert trained == [0.001], "restored and kept, not run again"
    assert (work / "uniform-s3" / "result.json").exists()
    cmp.run_one(config, ["optim.lr=0.002"], "uniform", 3, 1, work, keep=keep)
    assert trained == [0.001, 0.002], "a kept run of other settings is run again"
    assert json.loads((keep / "uniform-s3" / "result.json").read_text())["result"]["lr"] == 0.002
    assert json.loads((keep / "uniform-s3" / "result.json").read_text())["result"]["torch_threads"] >= 1

    # A run finished before --keep was given reaches the keep folder when the comparison resumes with it.
    cmp.run_one(config, ["optim.lr=0.003"], "uniform", 4, 1, work)
    assert not (keep / "uniform-s4").exists()
    cmp.run_one(config, ["optim.lr=0.003"], "uniform", 4, 1, work, keep=keep)
    assert trained[-1] == 0.003 and len(trained) == 3, "kept, not run again"
    assert (keep / "uniform-s4" / "result.json").read_text() == (work / "uniform-s4" / "result.json").read_text()
    # A result.json cut off mid-write (here: a kept copy) counts as no result: the run is run again, not a crash.
    (work / "uniform-s4" / "result.json").unlink()
    (keep / "uniform-s4" / "result.json").write_text('{"key": {"con')
    cmp.run_one(config, ["optim.lr=0.003"], "uniform", 4, 1, work, keep=keep)
    assert len(trained) == 4 and json.loads((keep / "uniform-s4" / "result.json").read_text())["result"]["lr"] == 0.003

    # A checkout at another path, its config one that resolves to the same settings (it extends the first and
    # changes nothing): the kept runs are kept. A config that resolves otherwise, or other code, runs again.
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "repo", moved / "repo")
    (moved / "configs").mkdir()
    same = moved / "configs" / "debug.toml"
    same.write_text(f'extends = "{config}"\n')
    work2, keep2 = moved / "runs" / "cmp" / "tune", moved / "repo" / "kept" / "tune"
    cmp.run_one(str(same), ["optim.lr=0.003"], "uniform", 4, 1, work2, keep=keep2)
    assert len(trained) == 4, "kept in a checkout at another path"
    assert (work2 / "uniform-s4" / "result.json").exists()
    same.write_text(f'extends = "{config}"\n[optim]\nweight_decay = 0.01\n')
    cmp.run_one(str(same), ["optim.lr=0.003"], "uniform", 4, 1, work2, keep=keep2)
    assert len(trained) == 5, "a config that resolves to other settings is run again"
    monkeypatch.setattr(cmp, "code_sha256", lambda: "other code")
    cmp.run_one(str(same), ["optim.lr=0.003"], "uniform", 4, 1, work2, keep=keep2)
    assert len(trained) == 6, "a run of other code is run again"
    # A recorded key that is not one (hand-edited, another tool's) counts as other settings, not a crash.
    for bad in ({"config": 5, "config_sha256": "x", "code_sha256": "y", "overrides": [1]}, [], None, "key"):
        assert not cmp.same_settings(bad, cmp.run_key(config, ["optim.lr=0.003"], cmp.load_train_config(config, [])))


def test_jobs_refuse_runs_on_gpus_before_running_any(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--jobs N > 1 splits the cores; runs that train on a GPU or launch a CUDA engine would all get the same devices,
    so such a comparison is refused at the start, naming the arms (an arm's own overrides count), as is --jobs 0."""
    out = str(tmp_path / "cmp.json")
    config = str(Path(__file__).resolve().parents[1] / "configs" / "debug.toml")
    argv = ["--config", config, "--out", out, "--steps", "1", "--seeds", "1", "--allocators", "uniform,gpu"]
    gpu_arm = 'gpu=uniform|model.device="cuda"'
    with pytest.raises(SystemExit):
        cmp.main([*argv, "--arm", gpu_arm, "--jobs", "2"])
    assert "arms ['gpu'] cannot run side by side: they run on GPUs" in capsys.readouterr().err
    cuda_engine = 'gpu=uniform|engine.extra_args=["--device", "cuda:1"]'
    with pytest.raises(SystemExit):
        cmp.main([*argv, "--arm", cuda_engine, "--jobs", "2"])
    assert "arms ['gpu'] cannot run side by side: they run on GPUs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cmp.main([*argv, "--arm", "gpu=uniform", "--jobs", "0"])
    assert "--jobs 0: at least 1" in capsys.readouterr().err
    assert not list(tmp_path.glob("cmp/*")), "nothing ran"


def _pid_then_sleep(folder: str, i: int) -> dict:
    import os
    import time

    (Path(folder) / f"pid-{i}").write_text(str(os.getpid()))
    time.sleep(600)
    return {"i": i}


def _gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts as gone)."""
    try:
        state = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("State:"))
    except FileNotFoundError:
        return True
    return "Z" in state.split()[1]


def _wait_for(cond, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


# A spawned worker imports torch and this module before its call starts: seconds, more on loaded cores.
WORKERS_START_S = 120


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.timeout(2 * WORKERS_START_S + 120)
def test_jobs_stop_with_the_comparison_interrupted_or_killed(tmp_path: Path) -> None:
    """Ctrl-C in a --jobs comparison returns at once and ends the workers (a run is minutes; the pool's own shutdown
    would wait for it), and a comparison killed outright (SIGKILL: nothing of it runs) takes its workers with it, so
    that no run goes on training into a folder a resumed comparison would train into again."""
    import os
    import signal
    import subprocess
    import threading
    import time

    started: list[bool] = []
    sent: list[float] = []
    returned = threading.Event()
    lock = threading.Lock()  # run_many's return and the signal: one or the other, so no SIGINT reaches a later test

    def interrupt_once_both_run() -> None:  # a real SIGINT, as Ctrl-C sends: it wakes a blocked wait
        both = lambda: returned.is_set() or len(list(tmp_path.glob("pid-*"))) == 2  # noqa: E731
        started.append(_wait_for(both, WORKERS_START_S) and not returned.is_set())
        with lock:
            if not returned.is_set():  # also when they never started: the test fails below, it does not hang
                sent.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)

    # Python turns SIGINT into KeyboardInterrupt only if SIGINT was not ignored when it started, and a shell ignores
    # it in a command it runs in the background (`pytest ... &`): there the signal did nothing and the test waited
    # for pytest's timeout (the suite at 2e77f6e). Ctrl-C's own handler, for the test's length.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt_once_both_run, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            cmp.run_many([((str(tmp_path), i), {}) for i in range(4)], jobs=2, fn=_pid_then_sleep)
    finally:
        try:
            with lock:
                returned.set()
        finally:  # restored even if the interrupt lands here (run_many failed otherwise as it was sent)
            signal.signal(signal.SIGINT, before)
    assert started == [True], f"the workers never started (in {WORKERS_START_S} s)"
    assert time.monotonic() - sent[0] < 30, "returned at the interrupt, not after the calls under way (600 s each)"
    pids = [int(f.read_text()) for f in tmp_path.glob("pid-*")]
    assert len(pids) == 2 and _wait_for(lambda: all(map(_gone, pids)), 30), "the workers ended with the interrupt"

    killed = tmp_path / "killed"
    killed.mkdir()
    script = (
        f"import sys; sys.path[:0] = [{str(BENCH)!r}, {str(Path(__file__).parent)!r}]\n"
        "import test_compare_bench as t\n"  # registers compare_allocators as the module the workers unpickle from
        f"t.cmp.run_many([(({str(killed)!r}, i), {{}}) for i in range(4)], jobs=2, fn=t._pid_then_sleep)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    try:
        assert _wait_for(lambda: len(list(killed.glob("pid-*"))) == 2, WORKERS_START_S), "the workers never started"
        pids = [int(f.read_text()) for f in killed.glob("pid-*")]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _wait_for(lambda: all(map(_gone, pids)), 30), "a worker outlived its comparison"
    finally:
        proc.kill()
        for f in killed.glob("pid-*"):
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(int(f.read_text()), signal.SIGKILL)


def test_a_comparison_with_clashing_runs_is_refused_before_running_any(tmp_path: Path, capsys) -> None:
    """Runs that would share a folder (an arm named twice; two rates that print alike) or, with --jobs, engines
    attached by URL (each run would push its weights into them), an arm whose config does not load, and arguments
    that do not parse are refused at the start (exit 2) with the reason."""
    config = str(Path(__file__).resolve().parents[1] / "configs" / "debug.toml")
    argv = ["--config", config, "--out", str(tmp_path / "cmp.json"), "--steps", "1", "--seeds", "1"]
    for extra, msg in (
        (["--allocators", "uniform,trace,uniform"], "--allocators names ['uniform'] twice"),
        (["--allocators", "uniform", "--sweep-lrs", "1e-4,0.0001"], "two rates name the same tuning runs"),
        (
            ["--allocators", "uniform,url", "--arm", 'url=uniform|engine.urls=["http://127.0.0.1:9"]', "--jobs", "2"],
            "arms ['url'] cannot run side by side: they attach to the same engines (engine.urls)",
        ),
        # a user-side audit: a typo in a later arm was found when its run started, after the arms before it had run
        (["--allocators", "uniform,tracee"], "arm tracee (tracee): "),
        (["--allocators", "uniform,x", "--arm", "x=trace|optim.lrr=1"], "arm x (trace|optim.lrr=1): "),
        (["--allocators", "uniform", "--arm", "broken"], "expected NAME=ALLOCATOR"),
        (["--allocators", "uniform", "--sweep-lrs", "1e-4,abc"], "comma-separated numbers"),
        (["--allocators", "uniform", "--sweep-lrs", "1e-4", "--tune-seeds", "0"], "must be >= 1"),
        (["--from-runs", str(tmp_path / "missing.runs.json")], "not a comparison's FILE.runs.json"),
    ):
        with pytest.raises(SystemExit) as e:
            cmp.main([*argv, *extra])
        assert e.value.code == 2 and msg in capsys.readouterr().err, extra
    assert not list(tmp_path.glob("cmp/*")), "nothing ran"

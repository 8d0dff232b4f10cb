"""TRACE vs its baselines at equal leaf budget (DESIGN §1 "Baselines", "Budget accounting").

    python bench/compare_allocators.py --steps K --seeds S --out FILE.json [--config configs/compare.toml]
        [--eval-every E] [--allocators trace,uniform,root-only,random-node] [--set section.field=value ...]
    python bench/compare_allocators.py --from-runs FILE.runs.json --out FILE.json   # summarise again, run nothing
    python bench/compare_allocators.py [the comparison's own arguments] --progress  # runs finished, time left
    python bench/compare_allocators.py ... --jobs 2 --keep bench/results/NAME  # 2 runs at once; results kept in git
    python bench/compare_allocators.py --steps 20 --seeds 8 --eval-every 2 --out FILE.json \
        --allocators uniform,trace,trace-fixed \
        --arm 'trace-fixed=trace|allocation.stage2_share="unmixed"|advantage.process_baseline="fresh"' \
        --sweep-lrs 2e-5,5e-5,1e-4 --tune-seeds 2       # the equal-care protocol (issue 22)

Arms: an --allocators entry is an allocator name, or an arm named by --arm NAME=ALLOCATOR|SET|SET... (a variant:
the allocator with extra --set overrides). --sweep-lrs: every arm runs each rate on --tune-seeds tuning seeds
(run.seed 10000, 10001, ...; never reported) and keeps the rate with the highest mean dev EM over the run's
evaluations (--tune-on final: the last evaluation's; either way FILE.tuning.json says what each figure picks);
the reported seeds 0..S-1 then run at each arm's own rate. Every arm of a seed starts from the same
warm start (model.tiny_seed, not run.seed) and draws from the same prompt stream (the same order; how far
into it a step reads differs by arm, as spilled continuations take new prompts and skips consume them). Against
GRPO ("uniform"), paired by seed, each a difference with its 95% interval: vs_grpo_dev_em_mean (the mean over the
run's evaluations: the primary figure) and vs_grpo_dev_em_final (the last evaluation's).

Each (allocator, seed) is a full `trace-train` run from the same SFT-warm-started tiny model (the
warm start is cached per seed, so every allocator of a seed starts from identical weights), with
exactly allocation.leaf_budget leaves per step for every allocator (allocators without stage 2 spend
it all at the roots; the trainer asserts it). FILE.json maps each allocator to its mean figures over
steps and seeds: effective ratio (mixed prompts / prompts that received rollouts), mixed prompts per
100 leaves (the equal-cost contrast figure), share of trained tokens with non-zero advantage, reward,
leaves and the leaf budget, tokens generated / prefilled / served from cache, predictor AUC, and dev
EM after K steps, and against GRPO (uniform): effective_ratio_vs_grpo and leaves_to_grpo_final (the cumulative
leaves at which the allocator's mean dev-EM curve first reaches GRPO's final dev EM; _frac: over GRPO's own run
length); per-seed rows go to FILE.runs.json. A markdown table is
printed and written next to FILE.json (FILE.md), with a bar plot (FILE.png). Each finished run leaves
result.json in its folder; the same command run again keeps a finished run whose settings are the same (the
resolved config, the code and the overrides, wherever the checkout is: `same_settings`), so a comparison stopped
part way resumes where it stopped, and reruns any other; --keep DIR also copies it into DIR and restores it from
there (a new checkout, whose runs/ is empty, at this path or another). --jobs N runs N CPU runs at once (`run_many`). A run
that fails is run once more (its folder kept as NAME.failed-1); a second failure stops the comparison with both
folders named.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from simulate_allocation import mean_ci  # bench/ is the script's own folder, first on sys.path

from trainer.config import load_train_config
from trainer.learner.config import uses_cpu
from trainer.loop import train
from trainer.services import launches_cuda_engines

ALL = ("trace", "uniform", "root-only", "random-node")
FIGURES = (
    "effective_ratio",
    "mixed_per_100_leaves",
    "nonzero_adv_token_frac",
    "reward_mean",
    "leaves",
    "leaf_budget",
    "generated_tokens",
    "prefill_tokens",
    "cached_prefill_tokens",
    "predictor_auc",
    "prompts_skipped",
)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else float("nan")


def parse_arm(spec: str) -> tuple[str, str, list[str]]:
    """--arm NAME=ALLOCATOR|SET|SET...: (name, allocator, extra --set overrides)."""
    name, sep, rest = spec.partition("=")
    parts = rest.split("|")
    if not sep or not name.strip() or not parts[0].strip():
        raise ValueError(f"--arm {spec!r}: expected NAME=ALLOCATOR|section.field=value|...")
    return name.strip(), parts[0].strip(), [p.strip() for p in parts[1:] if p.strip()]


def run_one(
    config: str | None,
    sets: list[str],
    allocator: str,
    seed: int,
    steps: int,
    out: Path,
    eval_every: int | None = None,
    *,
    arm: str | None = None,
    keep: Path | None = None,
) -> dict[str, Any]:
    """One `trace-train` run of `allocator` (named `arm`, default the allocator) at `seed`; its figures. `keep`: a
    folder mirroring `out` (`--keep`) that a finished run's result.json is copied to, and restored from when the run's
    own folder has none (a new checkout of a comparison that ran in an earlier one)."""
    arm = arm or allocator
    run_dir = out / f"{arm}-s{seed}"
    kept = keep / run_dir.name / "result.json" if keep is not None else None
    overrides = [
        *sets,
        f'allocation.type="{allocator}"',
        f"run.seed={seed}",
        f"run.steps={steps}",
        f'run.output_dir="{run_dir}"',
        f"run.eval_every={eval_every or steps}",
        "run.save_every=0",
        "run.plot=false",
    ]
    cfg = load_train_config(config, overrides)
    done = run_dir / "result.json"
    key = run_key(config, overrides, cfg)
    if kept is not None and _readable(kept) is not None and _readable(done) is None:
        _write_atomic(done, kept.read_text())
    if (saved := _readable(done)) is not None and same_settings(saved.get("key"), key):
        # a comparison stopped part way resumes: a finished run with the same settings is kept
        if kept is not None and _readable(kept) != saved:
            _write_atomic(kept, done.read_text())  # finished before --keep was given, or in another keep folder
        print(f"{arm} seed {seed}: kept from {done}")
        return saved["result"]
    t0 = time.perf_counter()
    for attempt in (1, 2):  # one failed run (an engine stalled past its timeout, say) must not end hours of others
        try:
            asyncio.run(train(cfg))
            break
        except Exception as e:
            failed = run_dir.with_name(f"{run_dir.name}.failed-{attempt}")  # kept: its logs say what happened
            shutil.rmtree(failed, ignore_errors=True)
            if run_dir.exists():
                run_dir.rename(failed)
            if attempt == 2:
                raise RuntimeError(
                    f"{arm} seed {seed} failed twice ({type(e).__name__}: {e}); logs in {run_dir.name}.failed-1 and "
                    f".failed-2 under {run_dir.parent}; the same command resumes (finished runs are kept)"
                ) from e
            print(f"{arm} seed {seed}: failed ({type(e).__name__}: {e}), logs moved to {failed}; once more", flush=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    res: dict[str, Any] = {k: _mean([r.get(k) for r in rows]) for k in FIGURES}
    res["dev_em"] = rows[-1].get("eval_em")
    res.update(dev_em_curve(rows))
    evals = [y for x, y in res["dev_em_curve"] if x > 0]
    res["dev_em_mean"] = _mean(evals)  # over the run's evaluations after training began (issue 22's primary)
    norms = [float(r["grad_norm"]) for r in rows if r.get("grad_norm") is not None]
    res["grad_norm"] = _mean(norms)
    res["clip_rate"] = _mean([float(x > cfg.optim.grad_clip) for x in norms]) if cfg.optim.grad_clip > 0 else 0.0
    res["lr"] = cfg.optim.lr
    # predictor.probe_prompts' calibration probe (the same prompts for every arm of a seed): AUC over the whole run
    res["probe_auc"] = rows[-1].get("probe_auc_run", math.nan)
    res["continuations_to_mixed_frac"] = _mean(
        [r["continuations_to_mixed"] / r["continuations"] for r in rows if r.get("continuations")]
    )
    res["wall_s"] = time.perf_counter() - t0
    res["torch_threads"] = _torch_threads()  # the trainer's (--jobs gives each run cores // jobs)
    res["allocator"], res["seed"], res["base_allocator"] = arm, seed, allocator
    text = json.dumps({"key": key, "result": res}, indent=2)
    _write_atomic(done, text)
    if kept is not None:
        _write_atomic(kept, text)
    return res


# The packages a run executes: their source is part of a run's settings, so a comparison resumed after the code
# changed runs again (bench/run_peers.sh freezes the code in a worktree for the same reason).
CODE_PACKAGES = ("trainer", "env_server", "shared", "engine")


@functools.cache
def code_sha256() -> str:
    """sha256 over the source (*.py) of CODE_PACKAGES in this checkout, paths relative to it."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(q for pkg in CODE_PACKAGES for q in (root / pkg).rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def run_key(config: str | None, overrides: list[str], cfg: Any) -> dict[str, Any]:
    """What a finished run's result.json records of its settings (`same_settings` compares two): the config's path
    and overrides as given, the sha256 of the config they resolve to (`cfg`, every `extends` base and override
    applied, its output folder left out), and of the code that runs it (`code_sha256`)."""
    resolved = dataclasses.asdict(cfg)
    resolved["run"]["output_dir"] = None
    text = json.dumps(resolved, sort_keys=True, default=str)
    sha = hashlib.sha256(text.encode()).hexdigest()
    return {"config": config, "config_sha256": sha, "code_sha256": code_sha256(), "overrides": overrides}


def _portable(key: dict[str, Any]) -> dict[str, Any]:
    """`key` without where its checkout was: the config by its file name (what it resolves to is in config_sha256),
    the output folder by its last two parts (the comparison's folder of this run, e.g.
    `tune/uniform-lr0.0001-s10000`)."""

    def rel(o: str) -> str:
        name, sep, value = o.partition("=")
        if name.strip() != "run.output_dir" or not sep:
            return o
        parts = Path(value.strip().strip('"')).parts[-2:]
        return f'run.output_dir=".../{"/".join(parts)}"'

    config = key.get("config")
    return {**key, "config": Path(config).name if config else None, "overrides": [rel(o) for o in key["overrides"]]}


def same_settings(saved: Any, key: dict[str, Any]) -> bool:
    """Whether a finished run's recorded key (`saved`) names the settings of `key` (`run_key`'s): the same resolved
    config, code and overrides, wherever the checkout was, so that a comparison resumes in a checkout at another
    path but not after its code or config changed. A key written before keys held those hashes matches only with
    the same paths (bench/run_peers.sh's worktree path then stood for the code); a key that is not one, never."""
    try:
        if "config_sha256" not in saved or "code_sha256" not in saved:
            return saved == {"config": key["config"], "overrides": key["overrides"]}
        return _portable(saved) == _portable(key)
    except (TypeError, AttributeError, KeyError):
        return False


def _readable(path: Path) -> dict[str, Any] | None:
    """A result.json's content, or None when there is none or it cannot be read (cut off mid-write: run again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        if path.exists():
            print(f"{path}: unreadable, so the run counts as not finished")
        return None


def _write_atomic(dest: Path, text: str) -> None:
    """`text` written to dest by a rename, so that a reader (a resume, bench/commit_kept.sh's commit) never sees half
    a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(dest)


def cannot_run_beside(config: str | None, sets: list[str]) -> str | None:
    """Why runs of this config cannot run side by side (--jobs splits the cores, nothing else), or None: they train
    on a GPU or launch an engine that takes one (every run would get the same devices and engine.gpus), or they
    attach to engines at engine.urls (each run would push its weights into the same engines)."""
    cfg = load_train_config(config, sets)
    if not uses_cpu(cfg.model) or launches_cuda_engines(cfg):
        return "run on GPUs"
    if cfg.engine.urls:
        return "attach to the same engines (engine.urls)"
    return None


def _torch_threads() -> int:
    import torch  # loaded by the trainer's import already, after its OpenMP wait policy (shared/cpu_threads.py)

    return torch.get_num_threads()


def _worker_init(threads: int, parent: int) -> None:
    """A --jobs worker: dies with the comparison's process `parent` (Linux's parent-death signal: a comparison killed
    leaves no worker training on, whose run a resume would start a second time in the same folder; the run's engine
    and env server die with the worker in turn), and takes its share of the cores: torch's threads here,
    $OMP_NUM_THREADS for the run's children, and $TRACE_CPU_SHARE, the CPU engine's cap on its default threads."""
    import torch

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the comparison died before the signal was armed
            os._exit(1)
    os.environ["OMP_NUM_THREADS"] = os.environ["TRACE_CPU_SHARE"] = str(threads)
    torch.set_num_threads(threads)


def run_many(specs: list[tuple[tuple, dict[str, Any]]], jobs: int = 1, fn: Any = None) -> list[dict[str, Any]]:
    """fn(*args, **kwargs) (default run_one) for each spec, `jobs` at a time; the results in the specs' order.
    jobs > 1: each call in a worker process of its own (spawned: a run starts its own engine and env server
    children, and no asyncio or torch state may be inherited), with cores // jobs threads (`_worker_init`). The first
    call that raises (run_one raises once a run failed twice) stops the rest: calls not yet handed to a worker are
    cancelled (the pool hands out up to jobs + 1 ahead, so one more may start), calls under way finish (their runs are
    kept for the resume), then its error is raised. Interrupted (Ctrl-C), it returns at once and the workers, with
    their runs, die with this process. A worker that dies breaks the pool: every call under way fails with it."""
    fn = fn or run_one
    if jobs <= 1:
        return [fn(*a, **kw) for a, kw in specs]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_worker_init, initargs=(max(1, cores // jobs), os.getpid())
    )
    try:
        futures = [pool.submit(fn, *a, **kw) for a, kw in specs]
        done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    except BaseException:  # Ctrl-C: the pool's own shutdown would wait for the calls under way (a run is minutes)
        workers = list((getattr(pool, "_processes", None) or {}).values())  # no public way to stop a running call
        pool.shutdown(wait=False, cancel_futures=True)
        for w in workers:
            w.terminate()
        raise
    with pool:
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            for f in futures:
                f.cancel()
            raise failed.exception()  # type: ignore[misc]
        return [f.result() for f in futures]


def dev_em_curve(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's leaves per step (all equal, or an AssertionError naming the steps) and its dev EM against
    cumulative leaves: [[0, EM before training], [leaves after step k, EM then], ...]."""
    leaves = [int(r["leaves"]) for r in rows]
    assert len(set(leaves)) == 1, f"unequal leaves per step {leaves}: not an equal-cost run"
    curve = [[0, rows[0]["eval_em_before"]]] if rows and rows[0].get("eval_em_before") is not None else []
    total = 0
    for r in rows:
        total += int(r["leaves"])
        if r.get("eval_em") is not None:
            curve.append([total, r["eval_em"]])
    return {"leaves_per_step": leaves[0], "dev_em_curve": curve}


def summarise(runs: list[dict[str, Any]], allocators: list[str]) -> dict[str, dict[str, Any]]:
    """Per allocator: the mean of every figure over seeds, and the equal-cost figures of issue 12's comparison."""
    out: dict[str, dict[str, Any]] = {}
    per_step = {r["leaves_per_step"] for r in runs}
    assert len(per_step) == 1, f"allocators ran at different leaves per step {sorted(per_step)}: not equal cost"
    if len(threads := sorted({r["torch_threads"] for r in runs if r.get("torch_threads")})) > 1:
        print(f"note: the runs trained with different torch thread counts {threads} (resumed with another --jobs?)")
    for a in allocators:
        mine = [r for r in runs if r["allocator"] == a]
        # .get: a runs.json written before a figure existed (--from-runs) summarises with that figure n/a
        out[a] = {k: _mean([r.get(k) for r in mine]) for k in (*FIGURES, "dev_em", "wall_s")}
        out[a]["seeds"] = len(mine)
        out[a]["leaves_per_step"] = mine[0]["leaves_per_step"]
        finals = [float(r["dev_em"]) for r in mine if r["dev_em"] is not None]
        out[a]["dev_em_final"], out[a]["dev_em_final_ci95"] = mean_ci(finals)
        points = sorted({p[0] for r in mine for p in r["dev_em_curve"]})
        out[a]["dev_em_curve"] = [
            [x, _mean([p[1] for r in mine for p in r["dev_em_curve"] if p[0] == x])] for x in points
        ]
        out[a]["dev_em_curve_ci95"] = [
            [x, mean_ci([p[1] for r in mine for p in r["dev_em_curve"] if p[0] == x])[1]] for x in points
        ]
        for k in ("dev_em_mean", "grad_norm", "clip_rate", "probe_auc", "continuations_to_mixed_frac"):
            out[a][k] = _mean([r.get(k) for r in mine])
        out[a]["lr"] = mine[0].get("lr")
    if "uniform" in out:  # paired by seed against GRPO: the mean dev EM over each run's evaluations (issue 22)
        base = {r["seed"]: r for r in runs if r["allocator"] == "uniform"}
        for a in out:
            for k, name in (("dev_em_mean", "vs_grpo_dev_em_mean"), ("dev_em", "vs_grpo_dev_em_final")):
                d = [
                    r[k] - base[r["seed"]][k]
                    for r in runs
                    if r["allocator"] == a
                    and r["seed"] in base
                    and r.get(k) is not None
                    and base[r["seed"]].get(k) is not None
                ]
                out[a][name], out[a][f"{name}_ci95"] = mean_ci(d) if d else (math.nan,) * 2
    if "uniform" in out:  # issue 12's goals, against GRPO, from the mean curves
        grpo = out["uniform"]
        for s in out.values():
            # GRPO with no mixed prompt at all (the debug config can): the ratio is undefined, not a crash
            base = grpo["effective_ratio"]
            s["effective_ratio_vs_grpo"] = s["effective_ratio"] / base if base > 0 else math.nan
            reached = leaves_to(s["dev_em_curve"], grpo["dev_em_final"])
            run_length = grpo["dev_em_curve"][-1][0] if grpo["dev_em_curve"] else math.nan
            s["leaves_to_grpo_final"] = reached
            s["leaves_to_grpo_final_frac"] = math.nan if reached is None else reached / run_length
    return out


def leaves_to(curve: list[list[float]], target: float) -> float | None:
    """The cumulative leaves at which a mean dev-EM curve first reaches `target` (None: never)."""
    return next((x for x, y in curve if y >= target), None)


def table(summary: dict[str, dict[str, Any]]) -> str:
    cols = (
        "leaves_per_step",
        "effective_ratio",
        "mixed_per_100_leaves",
        "nonzero_adv_token_frac",
        "reward_mean",
        "dev_em_final",
        "dev_em_final_ci95",
        "dev_em_mean",
        "vs_grpo_dev_em_mean",
        "vs_grpo_dev_em_mean_ci95",
        "vs_grpo_dev_em_final",
        "vs_grpo_dev_em_final_ci95",
        "leaves_to_grpo_final",
        "lr",
        "grad_norm",
        "clip_rate",
        "predictor_auc",
        "probe_auc",
        "continuations_to_mixed_frac",
        "generated_tokens",
        "prefill_tokens",
    )
    lines = ["| allocator | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for a, s in summary.items():
        cells = (
            "n/a"
            if s.get(c) is None or (isinstance(s[c], float) and math.isnan(s[c]))
            else f"{s[c]:.2g}"
            if c == "lr"
            else f"{s[c]:.3f}"
            if s[c] < 100
            else f"{s[c]:.0f}"
            for c in cols
        )
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("effective_ratio", "nonzero_adv_token_frac", "reward_mean", "dev_em")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    names = list(summary)
    for ax, k in zip(axes, keys, strict=True):
        ax.bar(names, [summary[n][k] for n in names])
        ax.set_title(k)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name in names:
        xs = [p[0] for p in summary[name]["dev_em_curve"]]
        ys = [p[1] for p in summary[name]["dev_em_curve"]]
        half = [0.0 if math.isnan(p[1]) else p[1] for p in summary[name]["dev_em_curve_ci95"]]
        ax.plot(xs, ys, marker="o", ms=3, label=name)
        ax.fill_between(
            xs,
            [y - h for y, h in zip(ys, half, strict=True)],
            [y + h for y, h in zip(ys, half, strict=True)],
            alpha=0.2,
        )
    ax.set_xlabel("cumulative leaves")
    ax.set_ylabel("greedy dev EM")
    ax.set_title(f"dev EM vs leaves (mean, 95% band over {summary[names[0]]['seeds']} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".dev_em.png"), dpi=100)
    plt.close(fig)


TUNE_SEED0 = 10_000
"""Tuning runs use run.seed TUNE_SEED0, TUNE_SEED0 + 1, ...: never a reported seed."""


TUNE_ON = {"mean": "dev_em_mean", "final": "dev_em"}
"""--tune-on: the figure of a tuning run a rate is chosen by: the mean dev EM over the run's evaluations (the
protocol's, issue 22: it rewards a fast start) or the last evaluation's (it rewards the end)."""


def tune_rates(args: argparse.Namespace, names: list[str], arms: dict[str, tuple[str, list[str]]], work: Path) -> dict:
    """Each arm's rate of --sweep-lrs: the one with the highest --tune-on figure (default the mean dev EM over the
    run's evaluations), averaged over the tuning seeds. Writes the scores to work/sweep.json."""
    lrs = [float(x) for x in args.sweep_lrs.split(",") if x.strip()]
    key = TUNE_ON[args.tune_on]
    keep = Path(args.keep) / "tune" if getattr(args, "keep", None) else None
    plan = [(a, lr, k) for a in names for lr in lrs for k in range(args.tune_seeds)]
    specs = [
        ((args.config, [*args.set, *arms[a][1], f"optim.lr={lr}"], arms[a][0], TUNE_SEED0 + k, args.steps,
          work / "tune", args.eval_every), {"arm": f"{a}-lr{lr:g}", "keep": keep})
        for a, lr, k in plan
    ]  # fmt: skip
    results = run_many(specs, getattr(args, "jobs", 1))
    scores: dict[str, dict[str, float]] = {}
    for a in names:
        for lr in lrs:
            ems = [r[key] for (a2, lr2, _), r in zip(plan, results, strict=True) if (a2, lr2) == (a, lr)]
            scores.setdefault(a, {})[str(lr)] = _mean(ems)
            print(f"tuning {a} lr {lr:g}: {args.tune_on} dev EM {scores[a][str(lr)]:.3f}")
    best = {a: max(sorted(lrs), key=lambda lr, a=a: scores[a][str(lr)]) for a in names}  # a tie: the lower rate
    sweep = {"tuned_on": args.tune_on, "scores": scores, "rates": best}
    (work / "sweep.json").write_text(json.dumps(sweep, indent=2))
    return best


def tuning_sensitivity(tune_dir: Path, arms: list[str], lrs: list[float] | None = None) -> dict[str, dict[str, Any]]:
    """What the tuning runs under `tune_dir` (`{arm}-lr{lr}-s{seed}/result.json`, finished ones; a run kept aside as
    `.failed-N` is not one) say under either --tune-on figure: per arm, each rate's mean dev EM over the run and final
    dev EM averaged over its tuning seeds, and the rate each figure picks (a tie goes to the lower rate). `lrs`: the
    comparison's sweep (its sweep.json), so that runs another sweep left in the folder at other rates are not read.
    Says whether the comparison's rates hang on the protocol's choice of figure; {} when there are no tuning runs."""
    per: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for f in sorted(tune_dir.glob("*/result.json")):
        if ".failed-" in f.parent.name:
            continue
        r = json.loads(f.read_text())["result"]
        arm = str(r["allocator"]).rsplit("-lr", 1)[0]
        if arm in arms and (lrs is None or float(r["lr"]) in lrs):
            per.setdefault(arm, {}).setdefault(float(r["lr"]), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for arm in (a for a in arms if a in per):
        rates = {
            lr: {fig: _mean([r[key] for r in rs]) for fig, key in TUNE_ON.items()} | {"seeds": len(rs)}
            for lr, rs in sorted(per[arm].items())
        }
        picks = {f"rate_by_{fig}": max(rates, key=lambda lr, fig=fig: rates[lr][fig]) for fig in TUNE_ON}
        out[arm] = {"rates": {f"{lr:g}": v for lr, v in rates.items()}, **picks}
    return out


def print_sensitivity(sens: dict[str, dict[str, Any]]) -> None:
    for arm, s in sens.items():
        cells = ", ".join(f"{lr}: {v['mean']:.3f} / {v['final']:.3f} (n={v['seeds']})" for lr, v in s["rates"].items())
        print(f"tuning {arm}: by mean {s['rate_by_mean']:g}, by final {s['rate_by_final']:g} (mean / final: {cells})")


def progress(
    work: Path,
    names: list[str],
    lrs: list[float],
    tune_seeds: int,
    seeds: int,
    jobs: int = 1,
    keep: Path | None = None,
) -> dict[str, Any]:
    """How far a comparison with these arms, rates and seeds has got: its planned runs (tuning runs, then reported
    ones) that have a result.json under `work` or in the --keep folder `keep`, and a time left from the finished
    ones' median wall time, `jobs` at a time (a run slowed by other work on the cores does not move it much; the
    estimate ignores the wait for the last tuning runs before the reported ones start). A result.json whose settings
    differ from the command's counts here but is run again on resume: the count is an upper bound of what will be
    kept."""
    tune = [work / "tune" / f"{a}-lr{lr:g}-s{TUNE_SEED0 + k}" for a in names for lr in lrs for k in range(tune_seeds)]
    reported = [work / f"{a}-s{seed}" for seed in range(seeds) for a in names]
    found = {}
    for d in tune + reported:
        for f in (d / "result.json", *([keep / d.relative_to(work) / "result.json"] if keep is not None else [])):
            if (saved := _readable(f)) is not None:  # one cut off mid-write is not finished (as on resume)
                found[d] = saved
                break
    done = list(found)
    walls = [found[d]["result"].get("wall_s") for d in done]
    known = [float(w) for w in walls if w is not None]
    wall = statistics.median(known) if known else None
    left = len(tune) + len(reported) - len(done)
    return {
        "tuning_done": sum(d in done for d in tune),
        "tuning_planned": len(tune),
        "reported_done": sum(d in done for d in reported),
        "reported_planned": len(reported),
        "median_run_s": wall,
        "hours_left": None if wall is None else left * wall / max(1, jobs) / 3600,
        "next": next((d.name for d in tune + reported if d not in done), None),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default="runs/compare_allocators.json")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "compare.toml"))
    p.add_argument("--eval-every", type=int, default=None, help="dev EM every E steps (default: at the end only)")
    p.add_argument(
        "--allocators",
        default=None,
        help=f"comma-separated allocators and --arm names (default: {','.join(ALL)}; "
        "with --from-runs, every arm of the runs)",
    )
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--arm", action="append", default=[], help="NAME=ALLOCATOR|SET|SET...: a variant to compare")
    p.add_argument("--sweep-lrs", default="", help="comma-separated optim.lr values: each arm's own rate, tuned")
    p.add_argument("--tune-seeds", type=int, default=2, help="tuning seeds of --sweep-lrs (never reported)")
    p.add_argument(
        "--tune-on",
        choices=list(TUNE_ON),
        default="mean",
        help="the tuning runs' figure a rate is chosen by: mean dev EM over the run (the protocol's) or the final",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="CPU runs at once, each in its own process with cores // jobs threads (a run is a trainer, its engine and "
        "env server; docs/trainer.md has the throughput measured on 2 cores); arms on GPUs are refused",
    )
    p.add_argument(
        "--keep",
        default=None,
        help="a folder (in a git checkout, say) that each finished run's result.json is copied to, mirroring the work "
        "folder, and restored from on resume: a comparison that outlives its machine's scratch space",
    )
    p.add_argument(
        "--from-runs", default=None, help="summarise FILE.runs.json of a finished comparison again, run nothing"
    )
    p.add_argument(
        "--progress",
        action="store_true",
        help="with the comparison's own arguments: how many of its runs have finished and the time left; run nothing",
    )
    args = p.parse_args(argv)
    allocators = [a.strip() for a in (args.allocators or ",".join(ALL)).split(",") if a.strip()]
    out = Path(args.out)
    try:
        lrs = [float(x) for x in args.sweep_lrs.split(",") if x.strip()]
    except ValueError:
        p.error(f"--sweep-lrs {args.sweep_lrs!r}: comma-separated numbers, e.g. 5e-5,1e-4,2e-4")
    if args.from_runs:
        try:
            saved = json.loads(Path(args.from_runs).read_text())
            runs, args.steps, args.seeds = saved["runs"], saved["steps"], saved["seeds"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--from-runs {args.from_runs}: not a comparison's FILE.runs.json ({type(e).__name__}: {e})")
        present = list(dict.fromkeys(r["allocator"] for r in runs))  # in the order they ran (GRPO first)
        absent = [a for a in allocators if a not in present]
        if args.allocators is not None and absent:
            p.error(f"--allocators names {absent}, which {args.from_runs} has no runs of (it has {present})")
        allocators = present if args.allocators is None else allocators
    elif args.progress:
        keep = Path(args.keep) if args.keep else None
        st = progress(out.with_suffix(""), allocators, lrs, args.tune_seeds if lrs else 0, args.seeds, args.jobs, keep)
        left = "n/a" if st["hours_left"] is None else f"{st['hours_left']:.1f} h"
        print(
            f"tuning runs {st['tuning_done']}/{st['tuning_planned']}, reported runs {st['reported_done']}/"
            f"{st['reported_planned']}; next {st['next']}; ~{left} left at the finished runs' median "
            + ("n/a" if st["median_run_s"] is None else f"{st['median_run_s'] / 60:.1f} min")
        )
        return 0
    else:
        arms = {a: (a, []) for a in allocators}
        for spec in args.arm:
            try:
                name, alloc, extra = parse_arm(spec)
            except ValueError as e:
                p.error(str(e))
            arms[name] = (alloc, extra)
        if min(args.steps, args.seeds) < 1 or (lrs and args.tune_seeds < 1):
            p.error(
                f"--steps ({args.steps}), --seeds ({args.seeds}) and, with --sweep-lrs, --tune-seeds "
                f"({args.tune_seeds}) must be >= 1"
            )
        for a in allocators:  # every arm's config, before any run: a typo in the last arm fails now, not hours in
            try:
                load_train_config(args.config, [*args.set, *arms[a][1], f'allocation.type="{arms[a][0]}"'])
            except (ValueError, OSError) as e:
                p.error(f"arm {a} ({'|'.join([arms[a][0], *arms[a][1]])}): {e}")
        work = out.with_suffix("")
        work.mkdir(parents=True, exist_ok=True)
        if args.jobs < 1:
            p.error(f"--jobs {args.jobs}: at least 1")
        if dup := sorted({a for a in allocators if allocators.count(a) > 1}):
            p.error(f"--allocators names {dup} twice: their runs would share a folder")
        if args.sweep_lrs and len({f"{float(x):g}" for x in lrs}) < len(lrs):
            p.error(f"--sweep-lrs {args.sweep_lrs}: two rates name the same tuning runs ({[f'{x:g}' for x in lrs]})")
        if args.jobs > 1:
            why = {a: r for a in allocators if (r := cannot_run_beside(args.config, [*args.set, *arms[a][1]]))}
            if why:
                reasons = "; ".join(sorted(set(why.values())))
                p.error(
                    f"--jobs {args.jobs}: arms {sorted(why)} cannot run side by side: they {reasons}. Run them one at "
                    "a time (--jobs 1) or on separate machines"
                )
        if not args.sweep_lrs:
            print(
                "note: no --sweep-lrs, so every arm runs at the config's one optim.lr: not the equal-care protocol "
                "(each arm at its own tuned rate); fine for a smoke run, not for a published comparison"
            )
        rates = tune_rates(args, allocators, arms, work) if args.sweep_lrs else {}
        keep = Path(args.keep) if args.keep else None
        plan = [(seed, a) for seed in range(args.seeds) for a in allocators]
        specs = [
            ((args.config, [*args.set, *arms[a][1], *([f"optim.lr={rates[a]}"] if a in rates else [])], arms[a][0],
              seed, args.steps, work, args.eval_every), {"arm": a, "keep": keep})
            for seed, a in plan
        ]  # fmt: skip
        runs = run_many(specs, args.jobs)
        for (seed, a), r in zip(plan, runs, strict=True):
            print(f"{a:12s} seed {seed}: " + ", ".join(f"{k}={r[k]:.3f}" for k in ("effective_ratio", "dev_em")))
    summary = summarise(runs, allocators)
    md = table(summary)
    print(md)
    out.write_text(json.dumps(summary, indent=2))
    # The tuning runs in the comparison's work folder: the rate either --tune-on figure picks (FILE.tuning.json).
    work = Path(args.from_runs.removesuffix(".runs.json")) if args.from_runs else out.with_suffix("")
    swept = work / "sweep.json"
    lrs = None
    if swept.exists():
        lrs = sorted({float(lr) for sc in json.loads(swept.read_text())["scores"].values() for lr in sc})
    if sens := tuning_sensitivity(work / "tune", allocators, lrs):
        print_sensitivity(sens)
        out.with_suffix(".tuning.json").write_text(json.dumps(sens, indent=2))
    out.with_suffix(".runs.json").write_text(
        json.dumps({"steps": args.steps, "seeds": args.seeds, "runs": runs}, indent=2)
    )
    out.with_suffix(".md").write_text(md + "\n")
    plot(summary, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

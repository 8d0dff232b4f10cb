"""TRACE vs its baselines at equal leaf budget (DESIGN §1 "Baselines", "Budget accounting").

    python bench/compare_allocators.py --steps K --seeds S --out FILE.json [--config configs/compare.toml]
        [--eval-every E] [--allocators trace,uniform,root-only,random-node] [--set section.field=value ...]
    python bench/compare_allocators.py --from-runs FILE.runs.json --out FILE.json   # summarise again, run nothing

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
printed and written next to FILE.json (FILE.md), with a bar plot (FILE.png).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from simulate_allocation import mean_ci  # bench/ is the script's own folder, first on sys.path

from trainer.config import load_train_config
from trainer.loop import train

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
)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else float("nan")


def run_one(
    config: str | None, sets: list[str], allocator: str, seed: int, steps: int, out: Path, eval_every: int | None = None
) -> dict[str, Any]:
    run_dir = out / f"{allocator}-s{seed}"
    cfg = load_train_config(
        config,
        [
            *sets,
            f'allocation.type="{allocator}"',
            f"run.seed={seed}",
            f"run.steps={steps}",
            f'run.output_dir="{run_dir}"',
            f"run.eval_every={eval_every or steps}",
            "run.save_every=0",
            "run.plot=false",
        ],
    )
    t0 = time.perf_counter()
    asyncio.run(train(cfg))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    res: dict[str, Any] = {k: _mean([r.get(k) for r in rows]) for k in FIGURES}
    res["dev_em"] = rows[-1].get("eval_em")
    res.update(dev_em_curve(rows))
    res["wall_s"] = time.perf_counter() - t0
    res["allocator"], res["seed"] = allocator, seed
    return res


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
    for a in allocators:
        mine = [r for r in runs if r["allocator"] == a]
        out[a] = {k: _mean([r[k] for r in mine]) for k in (*FIGURES, "dev_em", "wall_s")}
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
        "leaves_to_grpo_final",
        "generated_tokens",
        "prefill_tokens",
    )
    lines = ["| allocator | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for a, s in summary.items():
        cells = ("n/a" if s.get(c) is None else f"{s[c]:.3f}" if s[c] < 100 else f"{s[c]:.0f}" for c in cols)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default="runs/compare_allocators.json")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "compare.toml"))
    p.add_argument("--eval-every", type=int, default=None, help="dev EM every E steps (default: at the end only)")
    p.add_argument("--allocators", default=",".join(ALL))
    p.add_argument("--set", action="append", default=[])
    p.add_argument(
        "--from-runs", default=None, help="summarise FILE.runs.json of a finished comparison again, run nothing"
    )
    args = p.parse_args(argv)
    allocators = [a.strip() for a in args.allocators.split(",") if a.strip()]
    out = Path(args.out)
    if args.from_runs:
        saved = json.loads(Path(args.from_runs).read_text())
        runs, args.steps, args.seeds = saved["runs"], saved["steps"], saved["seeds"]
        allocators = [a for a in allocators if any(r["allocator"] == a for r in runs)]
    else:
        work = out.with_suffix("")
        work.mkdir(parents=True, exist_ok=True)
        runs = []
        for seed in range(args.seeds):
            for a in allocators:
                r = run_one(args.config, args.set, a, seed, args.steps, work, args.eval_every)
                print(f"{a:12s} seed {seed}: " + ", ".join(f"{k}={r[k]:.3f}" for k in ("effective_ratio", "dev_em")))
                runs.append(r)
    summary = summarise(runs, allocators)
    md = table(summary)
    print(md)
    out.write_text(json.dumps(summary, indent=2))
    out.with_suffix(".runs.json").write_text(
        json.dumps({"steps": args.steps, "seeds": args.seeds, "runs": runs}, indent=2)
    )
    out.with_suffix(".md").write_text(md + "\n")
    plot(summary, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

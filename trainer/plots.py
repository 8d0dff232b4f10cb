"""PNG plots of a run's `metrics.jsonl`, drawn at the end of `trace-train` (`run.plot`).

Contract: `plot_metrics(out)` reads `<out>/metrics.jsonl` and writes `<out>/metrics.png` (one panel each for
reward, contrast, predictor calibration and the token ledger, against steps, and one of greedy EM against
cumulative leaves, the sampling cost, as `em_vs_leaves` computes it, with the share of dev questions answered
early); it returns the files written, [] when there are no rows. A metric measured before the first update
(`<key>_before` on the first row) is drawn at step -1. It only reads the metrics file, so it can be run again on
any finished or interrupted run. matplotlib is imported here, on use, with the non-interactive Agg backend.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = [
    ("reward", ["reward_mean", "train_em", "eval_em"]),
    ("contrast", ["effective_ratio", "nonzero_adv_token_frac"]),
    ("predictor", ["predictor_auc", "predictor_brier"]),
    ("tokens", ["generated_tokens", "prefill_tokens", "cached_prefill_tokens"]),
]
"""(title, metric keys) of each panel, left to right."""


EM_KEYS = ("eval_em", "train_em", "eval_early")
LABELS = {"eval_em": "dev EM", "train_em": "train EM", "eval_early": "dev answered early"}


def em_vs_leaves(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(cumulative leaves, value)]} for eval_em (dev), train_em and eval_early (the share of dev questions
    answered before their last hop): the evaluation before training at 0 leaves, then each evaluation at the
    leaves generated up to the end of its step."""
    out: dict[str, list[tuple[int, float]]] = {}
    for k in EM_KEYS:
        pts = [(0, rows[0][f"{k}_before"])] if rows and rows[0].get(f"{k}_before") is not None else []
        total = 0
        for r in rows:
            total += int(r.get("leaves") or 0)
            if r.get(k) is not None:
                pts.append((total, r[k]))
        if pts:
            out[k] = pts
    return out


def plot_metrics(out: Path) -> list[Path]:
    """PNG plots of metrics.jsonl (reward, effective ratio, predictor calibration, token ledger)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    if not rows:
        return []
    fig, axes = plt.subplots(1, len(PANELS) + 1, figsize=(5 * (len(PANELS) + 1), 3.6))
    for ax, (title, keys) in zip(axes, PANELS, strict=False):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if rows[0].get(f"{k}_before") is not None:  # measured before the first update: drawn at step -1
                pts.insert(0, (rows[0]["step"] - 1, rows[0][f"{k}_before"]))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_lines():  # a panel whose metrics no row holds stays empty, without a legend
            ax.legend(fontsize=7)
    ax = axes[-1]
    for k, pts in em_vs_leaves(rows).items():
        style = "--" if k == "eval_early" else "-"
        ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, label=LABELS[k])
    ax.set_title("greedy EM vs sampling cost")
    ax.set_xlabel("cumulative leaves")
    if ax.get_lines():
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = out / "metrics.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [png]

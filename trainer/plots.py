"""PNG plots of a run's `metrics.jsonl`, drawn at the end of `trace-train` (`run.plot`).

Contract: `plot_metrics(out)` reads `<out>/metrics.jsonl` and writes `<out>/metrics.png` (one panel each for
reward, contrast, predictor calibration and the token ledger); it returns the files written, [] when there are
no rows. A metric measured before the first update (`<key>_before` on the first row) is drawn at step -1. It
only reads the metrics file, so it can be run again on any finished or interrupted run. matplotlib is imported
here, on use, with the non-interactive Agg backend.
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
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (title, keys) in zip(axes, PANELS, strict=True):
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
    fig.tight_layout()
    png = out / "metrics.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [png]

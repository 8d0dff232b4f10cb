"""Experiment tracking: every metrics row the loop writes to `metrics.jsonl`, and the run's config, also go to the
trackers named in `run.report_to` ("wandb", "tensorboard"; several allowed; [] or ["none"] = only the jsonl).

Contract: the same per-step figures as `metrics.jsonl` (numbers only; a row's `step` is the tracker's step), a few
of the step's trajectories as text (`run.tracker_samples` trees: wandb a Table "samples", TensorBoard a markdown
table under "samples"), the config once at the start (wandb: the run config; TensorBoard: a JSON text under `config`). Trackers are opened and
closed off the event loop (wandb starts a service process). Weights & Biases reads its usual environment
(`WANDB_MODE=offline` runs with no network and syncs later with `wandb sync`; `WANDB_PROJECT`, `WANDB_ENTITY`);
TensorBoard writes event files under `<output_dir>/tensorboard`. A tracker named but not installed is a config
error naming the extra to install (`pip install -e '.[track]'`), raised before the run starts.
"""

from __future__ import annotations

import importlib.util
import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar


class Tracker(ABC):
    """One experiment tracker: `log` a metrics row, `close` at the end."""

    module: ClassVar[str]  # the package it needs

    @abstractmethod
    def log(self, row: dict[str, Any], step: int) -> None: ...

    @abstractmethod
    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """A few of the step's trajectories as a table (`trainer.dumps.sample_rows`), before its metrics row."""

    @abstractmethod
    def close(self) -> None: ...


class WandbTracker(Tracker):
    module = "wandb"

    def __init__(self, out: Path, run_name: str, config: dict[str, Any], project: str) -> None:
        import wandb

        self.run = wandb.init(project=project, name=run_name, dir=str(out), config=config, reinit="create_new")

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log(_numbers(row), step=step, commit=True)  # a row is a whole step: send it now

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        import wandb

        cols = list(rows[0]) if rows else list(SAMPLE_COLUMNS)
        table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
        self.run.log({"samples": table}, step=step, commit=False)  # the step's metrics row commits it

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker(Tracker):
    module = "tensorboard"

    def __init__(self, out: Path, run_name: str, config: dict[str, Any], project: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, row: dict[str, Any], step: int) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        cols = list(rows[0]) if rows else list(SAMPLE_COLUMNS)
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731  # one markdown table cell
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
        self.writer.add_text("samples", "\n".join(lines), step)

    def close(self) -> None:
        self.writer.close()


SAMPLE_COLUMNS = ("prompt_id", "question", "leaf", "round", "trajectory", "reward", "adv_outcome", "trained")
"""A sample row's columns (`trainer.dumps.sample_rows`)."""

TRACKERS: dict[str, type[Tracker]] = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}


def check_report_to(names: list[str]) -> None:
    """Config check: known names, installed packages. Raises ValueError saying what to change."""
    unknown = [n for n in names if n != "none" and n not in TRACKERS]
    if unknown:
        raise ValueError(f"run.report_to: unknown {unknown}; choose from none, {', '.join(TRACKERS)}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"run.report_to {names}: 'none' cannot be combined with a tracker")
    missing = [n for n in names if n in TRACKERS and importlib.util.find_spec(TRACKERS[n].module) is None]
    if missing:
        raise ValueError(f"run.report_to {missing}: not installed; pip install -e '.[track]'")


class Trackers:
    """The run's trackers together; with none named every call is a no-op."""

    def __init__(self, names: list[str], out: Path, run_name: str, config: dict[str, Any], project: str) -> None:
        check_report_to(names)
        self.trackers = [TRACKERS[n](out, run_name, config, project) for n in names if n != "none"]

    def log(self, row: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log(row, int(row["step"]))

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        for t in self.trackers:
            t.log_samples(rows, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers (booleans and ints as floats); strings, lists and None are left to the jsonl."""
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, int | float) and not (isinstance(v, float) and not math.isfinite(v))
    }

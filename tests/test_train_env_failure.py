"""A trainer that survives its env server (issue 14): real `trace-env serve` processes are SIGKILLed in the middle
of a TRACE step of the debug config (the kill fires from inside the step's rollouts, at a chosen rollout, so it
lands mid-step every time). With two replicas the step goes on with the other; with one, the trainer waits for it
to come back on the same port. Either way the lost trees are redone, the step keeps exactly its leaf budget, no
lost tree is trained on, and the metrics count what happened."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PYTHON, start_server_process, stop_process
from structlog.testing import capture_logs

from trainer import services
from trainer.algo.rollout import RolloutRunner
from trainer.algo.step import PromptSampler
from trainer.algo.tree import FinishStatus
from trainer.config import TrainConfig, load_train_config
from trainer.dumps import read_dump
from trainer.engines.launcher import free_port
from trainer.loop import train

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "run.prompts_per_step=3",
    "run.eval_every=0",
    "run.eval_before_train=false",
    "sft.max_examples=24",
    "sft.batch_size=12",
    "rollout.max_new_tokens=32",
    "env.train_limit=5",
    "run.save_trees=true",
    "run.save_every=0",
    "run.steps=1",
]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def start_env(cfg: TrainConfig, port: int) -> tuple[subprocess.Popen[str], str]:
    """A real env server on `port`, started as the trainer starts its own (`services.env_server_command`)."""
    cmd = services.env_server_command(cfg, services.world_dir(cfg), port)
    return start_server_process(cmd[1:], exe=[PYTHON])


def kill_at_rollout(monkeypatch: pytest.MonkeyPatch, n: int, kill: Callable[[], None]) -> list[float]:
    """SIGKILL (through `kill`) when the n-th rollout of the run starts playing; returns [the time it fired]."""
    fired: list[float] = []
    play = RolloutRunner.play
    count = 0

    async def counting(self: RolloutRunner, *args: object, **kwargs: object) -> object:
        nonlocal count
        count += 1
        if count == n:
            kill()
            fired.append(time.monotonic())
        return await play(self, *args, **kwargs)

    monkeypatch.setattr(RolloutRunner, "play", counting)
    return fired


def step_row(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0]
    return rows[0]


def check_batch(out: Path, row: dict, budget: int) -> None:
    """The step kept its budget exactly, and every tree trained on is whole."""
    assert row["leaves"] == row["leaf_budget"] == budget
    _, trees = read_dump(out / "trees" / "step_00000.jsonl.gz")  # no lost tree reaches the batch (collect asserts it)
    assert sum(t["ledger"]["leaves"] for t in trees) == budget
    assert all(n["status"] != FinishStatus.OPEN.value for t in trees for n in t["nodes"] if not n["children"])
    assert all(n["info"].get("round") is not None for t in trees for n in t["nodes"][1:]), "redone trees too"


@pytest.mark.parametrize(
    ("redo_attempts", "allocator"),
    [(2, "trace"), (0, "trace"), (0, "uniform"), (0, "greso")],
    ids=["redone", "dropped", "dropped-uniform", "dropped-greso"],
)
def test_one_of_two_replicas_dies_mid_step(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, redo_attempts: int, allocator: str
) -> None:
    """Redone (the same prompts again on the replica left) or, with env.redo_attempts 0, dropped (fresh prompts
    take their leaves, and the dropped ones go back to the stream, for an allocator that selects and for one that
    takes prompts as the stream gives them: in a multi-pass run none misses its pass)."""
    monkeypatch.setenv("TRACE_CACHE_DIR", str(cache_dir))
    out = tmp_path / "run"
    base = load_train_config(REPO / "configs" / "debug.toml", [*SMALL, f'run.output_dir="{out}"'])
    procs = [start_env(base, free_port()) for _ in range(2)]
    try:
        cfg = load_train_config(
            REPO / "configs" / "debug.toml",
            [
                *SMALL,
                f'run.output_dir="{out}"',
                f"env.urls={json.dumps([u for _, u in procs])}",
                f"env.redo_attempts={redo_attempts}",
                f'allocation.type="{allocator}"',
                # uniform: a split the step's draws cannot wrap, so only the fix gives the dropped prompt back
                # (greso: its replacement is drawn through its filter, `draw_replacement`)
                *(["env.train_limit=50"] if allocator in ("uniform", "greso") else []),
            ],
        )
        given_back: list[int] = []  # what the stream was given back (then given back for real)
        give_back = PromptSampler.give_back

        def recording(self: PromptSampler, idxs: list[int]) -> None:
            given_back.extend(idxs)
            give_back(self, idxs)

        monkeypatch.setattr(PromptSampler, "give_back", recording)
        fired = kill_at_rollout(monkeypatch, 6, lambda: os.kill(procs[1][0].pid, signal.SIGKILL))
        with capture_logs() as logs:
            asyncio.run(train(cfg))
        assert fired, "the kill fired during the step"
        row = step_row(out)
        check_batch(out, row, cfg.allocation.leaf_budget)
        events = [x["event"] for x in logs]
        assert row["env_failures"] >= 1 and "env replica went away; its episodes are lost" in events
        if redo_attempts:
            assert row["trees_redone"] >= 1 and row["trees_dropped"] == 0
            assert "redoing a rollout tree that lost its env state" in events
        else:
            assert row["trees_dropped"] >= 1 and row["trees_redone"] == 0
            dropped = [x for x in logs if x["event"].startswith("a prompt lost its env state too often")]
            assert len(dropped) == row["trees_dropped"]
            assert {x["idx"] for x in dropped} <= set(given_back), (dropped, given_back)
            if allocator == "greso":  # no history at the first step: the filter keeps every prompt, skips none
                assert row["prompts_skipped"] == 0
        assert "waiting for an env server to come back" not in events, "the other replica was up all along"
    finally:
        for p, _ in procs:
            stop_process(p, signal.SIGKILL)


def test_the_only_env_server_dies_and_comes_back(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACE_CACHE_DIR", str(cache_dir))
    out = tmp_path / "run"
    port = free_port()
    base = load_train_config(REPO / "configs" / "debug.toml", [*SMALL, f'run.output_dir="{out}"'])
    procs = [start_env(base, port)]
    sets = [*SMALL, f'run.output_dir="{out}"', f'env.urls=["{procs[0][1]}"]', "env.patience_s=120"]
    cfg = load_train_config(REPO / "configs" / "debug.toml", sets)

    def kill_and_restart() -> None:
        os.kill(procs[0][0].pid, signal.SIGKILL)

        def restart() -> None:
            time.sleep(4.0)  # long enough that rollouts and the redo find it down
            procs.append(start_env(base, port))

        threading.Thread(target=restart, daemon=True).start()

    try:
        fired = kill_at_rollout(monkeypatch, 6, kill_and_restart)
        with capture_logs() as logs:
            asyncio.run(train(cfg))
        assert fired and len(procs) == 2, "killed mid-step and restarted"
        row = step_row(out)
        check_batch(out, row, cfg.allocation.leaf_budget)
        assert row["env_failures"] >= 1 and row["trees_redone"] >= 1 and row["trees_dropped"] == 0
        events = [x["event"] for x in logs]
        assert "waiting for an env server to come back" in events
        assert "env replica is back; it takes new episodes" in events
    finally:
        for p, _ in procs:
            stop_process(p, signal.SIGKILL)

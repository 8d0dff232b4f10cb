"""`trace-train`'s main job: start (or attach to) the env server and the engines, warm-start the
tiny model by SFT if needed, then run TRACE RL steps.

This module holds the loop and only what it needs directly; the pieces it drives live beside it:
`trainer.sft` (the warm start), `trainer.evaluate` (greedy evaluation, the same path as `trace-train eval`
and `trace-eval --agent policy`), `trainer.checkpoint` (save, find, restore), `trainer.plots`.

The loop (fits on one screen, helpers below it): rollouts for step t+1 are started before step t's
update when `run.max_staleness >= 1`, so generation and training overlap; with 0 every rollout
uses the weights of the step before it. After each update the weights go to the engines
(save -> /update_weights_from_disk -> cache flushed) with a new weight version, which every node
of later trees records. Every child process and task is stopped on exit, Ctrl-C included.

What always holds:
- `metrics.jsonl` gets one row per step (and so does every tracker of `run.report_to`), in step order,
  written after the step's weights reach the engines; evaluations (`run.eval_every`) add `eval_em`/`eval_f1` (and `train_em`/`train_f1`) to the row
  of the step they follow, and with `run.eval_before_train` the evaluation of the starting weights lands on
  step 0's row as `<key>_before`.
- The weights the engines serve alternate between `weights/v1` and `weights/v2` (`v0`: the start), so
  the folder being loaded is never the one being written.
- Torch work (loading, updates, saving) runs on the one torch thread (`trainer.compute`); the event loop
  keeps serving rollouts and evaluations meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import structlog
from tqdm import tqdm

from shared.client import EnvClient
from trainer import services
from trainer.checkpoint import latest_checkpoint, reference_of, restore_checkpoint, save_checkpoint
from trainer.compute import compute
from trainer.config import TrainConfig, config_to_dict
from trainer.engine_client import EngineClient
from trainer.evaluate import evaluate, greedy_runner, split_size
from trainer.plots import plot_metrics
from trainer.policy import Policy
from trainer.rollout import RolloutRunner
from trainer.sft import run_sft
from trainer.trace import StepBatch, TraceStep
from trainer.tracking import Trackers

log = structlog.get_logger("trainer")


async def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    start = latest_checkpoint(out) if resume else None
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2, default=str))
    async with contextlib.AsyncExitStack() as stack:
        run = cfg.run
        track = await asyncio.to_thread(Trackers, run.report_to, out, run.name, config_to_dict(cfg), run.wandb_project)
        stack.push_async_callback(asyncio.to_thread, track.close)
        env_url = await stack.enter_async_context(services.env_server(cfg, out))
        env = await stack.enter_async_context(EnvClient(env_url, token=cfg.env.token))
        policy = await _initial_policy(cfg, env, out, start)
        weights = await compute(policy.save, out / "weights" / "v0")
        urls = await stack.enter_async_context(services.engines(cfg, weights, out))
        engine = await stack.enter_async_context(EngineClient(urls, max_concurrency=cfg.rollout.max_concurrency))
        await engine.wait_ready(cfg.engine.startup_timeout_s)  # attached engines may still be loading
        runner = RolloutRunner(env, engine, policy.tokenizer, cfg.rollout)
        n_train = split_size(await env.info(), cfg.env.dataset, cfg.env.train_split)
        if cfg.env.train_limit:
            n_train = min(n_train, cfg.env.train_limit)
        if cfg.model.path is not None:
            _warn_demo_defaults(cfg)
        trace = TraceStep(cfg, policy, runner, n_train)
        first = await compute(restore_checkpoint, trace, policy, start, out) if start else 0
        version = first
        greedy = greedy_runner(env, engine, policy.tokenizer, cfg.rollout)

        async def evals() -> dict[str, float]:
            res = await evaluate(greedy, cfg.env.dataset, cfg.env.eval_split, limit=cfg.run.eval_size)
            if cfg.run.eval_train:
                limit = min(cfg.run.eval_size, n_train)
                res.update(await evaluate(greedy, cfg.env.dataset, cfg.env.train_split, limit=limit, prefix="train"))
            return res

        before = await evals() if first == 0 and cfg.run.eval_every > 0 and cfg.run.eval_before_train else {}
        bar = tqdm(total=cfg.run.steps, initial=first, desc="trace-train", dynamic_ncols=True)
        pending: asyncio.Task[StepBatch] | None = None
        try:
            for step in range(first, cfg.run.steps):
                t0 = time.perf_counter()
                batch = await (pending or asyncio.create_task(trace.collect(step)))
                pending = None
                if cfg.run.max_staleness >= 1 and step + 1 < cfg.run.steps:
                    pending = asyncio.create_task(trace.collect(step + 1))  # overlaps the update below
                row = await compute(trace.update, batch)
                version += 1
                path = await compute(policy.save, out / "weights" / f"v{version % 2 + 1}")
                await engine.update_weights_from_disk(str(path), weight_version=str(version))
                if step == first:
                    row.update({f"{k}_before": v for k, v in before.items()})
                if _due(step, cfg.run.eval_every, cfg.run.steps):
                    row.update(await evals())
                row.update(step=step, weight_version=version, step_time_s=time.perf_counter() - t0)
                _append_metrics(out, row)
                await asyncio.to_thread(track.log, row)  # run.report_to: wandb / tensorboard, off the event loop
                if cfg.run.save_trees:
                    _save_trees(out, step, batch)
                if _due(step, cfg.run.save_every, cfg.run.steps):
                    await compute(save_checkpoint, out, step + 1, policy, trace)
                bar.update(1)
                bar.set_postfix(_postfix(row))
        finally:
            bar.close()
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
    if cfg.run.plot:
        plot_metrics(out)
    return out


# ---------------------------------------------------------------------------------------------- helpers
async def _initial_policy(cfg: TrainConfig, env: EnvClient, out: Path, start: Path | None) -> Policy:
    """The policy to train: a checkpoint (resume), else the given model, else the tiny model + SFT (cached)."""
    if start is not None:
        reference = await compute(reference_of, start, cfg)
        policy = await compute(_policy, start / "model", cfg, reference)
        policy.reference = reference  # None (a checkpoint older than the record) stays unknown, not the checkpoint
        return policy
    if cfg.model.path is not None:
        return await compute(_policy, cfg.model.path, cfg)
    path = await compute(services.tiny_model_dir, cfg)
    if cfg.sft.enabled:
        sft = services.sft_dir(cfg, path)
        if not (sft / "config.json").exists():
            await run_sft(cfg, env, path, sft)
        path = sft
    return await compute(_policy, path, cfg)


def _warn_demo_defaults(cfg: TrainConfig) -> None:
    """A run on a model of its own that keeps values tuned for the tiny CPU demo is told which ones."""
    demo = TrainConfig()
    kept = {
        f"{section}.{name}": getattr(getattr(cfg, section), name)
        for section, name in (("env", "train_limit"), ("optim", "lr"), ("optim", "kl_coef"))
        if getattr(getattr(cfg, section), name) == getattr(getattr(demo, section), name) != 0
    }
    if kept:
        log.warning(
            "values tuned for the tiny CPU demo", **kept, hint="see configs/qwen3-8b-hotpotqa.toml for a real run"
        )


def _policy(path: str | Path, cfg: TrainConfig, reference: str | Path | None = None) -> Policy:
    return Policy(
        path, cfg.model, cfg.optim, seed=cfg.run.seed, temperature=cfg.rollout.temperature, reference=reference
    )


def _due(step: int, every: int, steps: int) -> bool:
    return every > 0 and ((step + 1) % every == 0 or step + 1 == steps)


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    keys = ("reward_mean", "effective_ratio", "predictor_auc", "train_em", "eval_em")
    return {k.replace("_mean", "").replace("effective_", "eff_"): f"{row[k]:.3f}" for k in keys if k in row}


def _append_metrics(out: Path, row: dict[str, Any]) -> None:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(clean, sort_keys=True) + "\n")


def _save_trees(out: Path, step: int, batch: StepBatch) -> None:
    d = out / "trees"
    d.mkdir(exist_ok=True)
    with open(d / f"step_{step:05d}.jsonl", "w") as f:
        for t in batch.trees:
            f.write(json.dumps(t.to_dict()) + "\n")

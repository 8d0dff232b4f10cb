"""`trace-train`'s main job: start (or attach to) the env server and the engines, warm-start the
tiny model by SFT if needed, then run TRACE RL steps.

This module holds the loop and only what it needs directly; the pieces it drives live beside it:
`trainer.sft` (the warm start), `trainer.evaluate` (greedy evaluation, the same path as `trace-train eval`
and `trace-eval --agent policy`), `trainer.checkpoint` (save, find, restore), `trainer.plots`.

On several ranks (`trainer.learner.distributed`) this loop runs on rank 0 only; the policy's updates, saves and gathers
are collectives the other ranks join.

The loop (fits on one screen, helpers below it): rollouts for step t+1 are started before step t's
update when `run.max_staleness >= 1`, so generation and training overlap; with 0 every rollout
uses the weights of the step before it. After each update the weights go to the engines
(save -> /update_weights_from_disk -> cache flushed; or, with engine.weight_sync "group", gathered in memory and
broadcast over a process group with the engines, `trainer.engines.weight_sync`) with a new weight version, which every node
of later trees records; samples staler than `run.max_staleness` versions are dropped and counted
(`trainer.algo.staleness`). The push starts only once the update is done, and the engines pause while
it loads (`push_s`): generation of step t+1 stops for that long, and resumes on the new weights.
Every child process and task is stopped on exit, Ctrl-C included.

What always holds:
- `metrics.jsonl` gets one row per step (and so does every tracker of `run.report_to`), in step order,
  written after the step's weights reach the engines; evaluations (`run.eval_every`) add `eval_em`/`eval_f1` (and `train_em`/`train_f1`) to the row
  of the step they follow, and with `run.eval_before_train` the evaluation of the starting weights lands on
  step 0's row as `<key>_before`.
- The weights the engines serve alternate between `weights/v1` and `weights/v2` (`v0`: the start), so
  the folder being loaded is never the one being written.
- Torch work (loading, updates, saving) runs on the one torch thread (`trainer.learner.compute`); the event loop
  keeps serving rollouts and evaluations meanwhile, and with `run.max_staleness >= 1` the rollouts' own torch
  work (features, V(H)) runs on the inference thread, on copies `TraceStep.publish` refreshes after each update.
- Each row times its step, in seconds since `train` started: `collect_start`/`collect_end` (`rollout_s`,
  `collect_wait_s`: what its featurise/predict calls waited for their thread), `update_start`/`update_end`
  (`update_s`), `sync_end` (`sync_s`: save + push, `push_s`: the push alone, the engines paused), and
  `overlap_s`, the seconds of this step's collection that ran while the previous step's update and sync did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
import torch
from tqdm import tqdm

from shared.client import EnvClient
from shared.replicas import EnvPool
from trainer import services
from trainer.algo.allocation import make_allocator
from trainer.algo.rollout import RolloutRunner
from trainer.algo.step import StepBatch, TraceStep
from trainer.checkpoint import (
    latest_checkpoint,
    reference_of,
    restore_checkpoint,
    save_checkpoint,
    set_aside_previous_run,
)
from trainer.config import TrainConfig, config_to_dict
from trainer.dumps import config_hash, sample_rows, tree_record, write_dump
from trainer.engines.client import EngineClient
from trainer.engines.weight_sync import WeightSync
from trainer.evaluate import check_env_server, evaluate, greedy_runner, server_info, split_size
from trainer.learner.compute import compute
from trainer.learner.policy import Policy
from trainer.plots import plot_metrics
from trainer.sft import run_sft
from trainer.tracking import Trackers

log = structlog.get_logger("trainer")


async def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    start = latest_checkpoint(out) if resume else None
    conf = config_to_dict(cfg)
    conf_hash = config_hash(conf)  # in every tree dump's header
    t_run = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        run = cfg.run
        track = await asyncio.to_thread(Trackers, run.report_to, out, run.name, conf, run.wandb_project)
        stack.push_async_callback(asyncio.to_thread, track.close)
        env = await stack.enter_async_context(services.env_client(cfg, out))
        info = await server_info(env, cfg)
        check_env_server(cfg, info)  # before the warm start: a wrong URL fails in seconds, not minutes
        policy = await _initial_policy(cfg, env, out, start)
        weights = await compute(policy.save, out / "weights" / "v0")
        urls = await stack.enter_async_context(services.engines(cfg, weights, out))
        engine = await stack.enter_async_context(EngineClient(urls, max_concurrency=cfg.rollout.max_concurrency))
        await engine.wait_ready(cfg.engine.startup_timeout_s)  # attached engines may still be loading
        # Only now, with the env server, the model and the engines up: an earlier run's rows and checkpoints moved
        # aside (a start that fails before this leaves them where --resume finds them), and this run's config.
        if not resume and (moved := set_aside_previous_run(out)) is not None:
            log.warning(
                "a fresh run in the folder of an earlier one: its metrics and checkpoints were moved", to=str(moved)
            )
        (out / "config.json").write_text(json.dumps(conf, indent=2, default=str))
        sync = None
        if cfg.engine.weight_sync == "group":  # weights go over a process group with the engines, not through disk
            e = cfg.engine
            opened = WeightSync.open(engine, master_address=e.sync_address, bucket_bytes=e.sync_bucket_mb << 20)
            sync = await stack.enter_async_context(opened)
        a = cfg.allocation  # the entropy allocator's signal: top logprobs from the engine, each turn's entropy
        top = a.entropy_top_k if make_allocator(a.type).needs_entropy else 0
        runner = RolloutRunner(
            env, engine, policy.tokenizer, cfg.rollout, top_logprobs=top, entropy_tokens=a.entropy_tokens
        )
        n_train = split_size(info, cfg.env.dataset, cfg.env.train_split)
        if cfg.env.train_limit:
            n_train = min(n_train, cfg.env.train_limit)
        if cfg.model.path is not None:
            _warn_demo_defaults(cfg)
        trace = TraceStep(cfg, policy, runner, n_train)
        first = policy.version = await compute(restore_checkpoint, trace, policy, start, out) if start else 0
        if first or cfg.engine.urls:  # the engines report the policy's weight version from the start (staleness)
            await engine.update_weights_from_disk(str(weights), weight_version=str(first))
        await trace.publish()
        greedy = greedy_runner(env, engine, policy.tokenizer, cfg.rollout)

        async def evals() -> dict[str, float]:
            turns = cfg.env.max_turns
            res = await evaluate(greedy, cfg.env.dataset, cfg.env.eval_split, limit=cfg.run.eval_size, max_turns=turns)
            if cfg.run.eval_train:
                limit = min(cfg.run.eval_size, n_train)
                split = cfg.env.train_split
                res.update(await evaluate(greedy, cfg.env.dataset, split, limit=limit, prefix="train", max_turns=turns))
            return res

        before = await evals() if first == 0 and cfg.run.eval_every > 0 and cfg.run.eval_before_train else {}
        bar = tqdm(total=cfg.run.steps, initial=first, desc="trace-train", dynamic_ncols=True)
        pending: asyncio.Task[tuple[StepBatch, dict[str, float]]] | None = None
        trained = (0.0, 0.0)  # the previous step's update + sync: what this step's collection may overlap
        eval_failures = 0  # the greedy runner's env failures already in a metrics row
        try:
            for step in range(first, cfg.run.steps):
                t0 = time.perf_counter()
                batch, times = await (pending or asyncio.create_task(_collect(trace, step, t_run)))
                pending = None
                if cfg.run.max_staleness >= 1 and step + 1 < cfg.run.steps:
                    pending = asyncio.create_task(_collect(trace, step + 1, t_run))  # generates during the update
                u0 = time.perf_counter() - t_run
                row = await compute(trace.update, batch)
                u1 = time.perf_counter() - t_run
                policy.version += 1
                if sync is None:  # feed: under FSDP the feature copy takes the weights from this save's stream
                    path = await compute(policy.save, out / "weights" / f"v{policy.version % 2 + 1}", True)
                    push = _push(engine, path, policy.version)
                else:
                    push = _push_group(sync, policy, policy.version)
                _, push_s = await asyncio.gather(trace.publish(), push)
                s1 = time.perf_counter() - t_run
                times.update(update_start=u0, update_end=u1, sync_end=s1, update_s=u1 - u0, sync_s=s1 - u1)
                row.update(times, push_s=push_s, overlap_s=_overlap(times, trained))
                trained = (u0, s1)
                if step == first:
                    row.update({f"{k}_before": v for k, v in before.items()})
                if _due(step, cfg.run.eval_every, cfg.run.steps):
                    row.update(await evals())
                # Env failures of this step's rollouts (collect) plus those of its evals (the greedy runner's).
                row["env_failures"] = row.get("env_failures", 0.0) + greedy.env_failures - eval_failures
                eval_failures = greedy.env_failures
                row.update(step=step, weight_version=policy.version, world_size=policy.world_size)
                if cfg.run.save_trees or (cfg.run.tracker_samples and track.trackers):  # off the event loop
                    cost, records = await asyncio.to_thread(_tree_records, out, step, batch, trace, conf_hash)
                    row.update(cost)
                    if cfg.run.tracker_samples and track.trackers:
                        samples = sample_rows(records, cfg.run.tracker_samples)
                        await asyncio.to_thread(track.log_samples, samples, step)
                row.update(step_time_s=time.perf_counter() - t0)
                _append_metrics(out, row)
                await asyncio.to_thread(track.log, row)  # run.report_to: wandb / tensorboard, off the event loop
                if _due(step, cfg.run.save_every, cfg.run.steps):
                    await compute(save_checkpoint, out, step + 1, policy, trace, cfg.run.keep_checkpoints)
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
async def _initial_policy(cfg: TrainConfig, env: EnvClient | EnvPool, out: Path, start: Path | None) -> Policy:
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
        async with services.acache_lock(sft.name):  # a run started beside this one waits, then takes this one's
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


async def _collect(trace: TraceStep, step: int, t_run: float) -> tuple[StepBatch, dict[str, float]]:
    """trace.collect(step) and its timings (seconds since t_run), for the step's metrics row."""
    waited, start = trace.infer_wait_s, time.perf_counter() - t_run
    batch = await trace.collect(step)
    end = time.perf_counter() - t_run
    return batch, {
        "collect_start": start,
        "collect_end": end,
        "rollout_s": end - start,
        "collect_wait_s": trace.infer_wait_s - waited,
    }


def _overlap(times: dict[str, float], trained: tuple[float, float]) -> float:
    """Seconds of the collection [collect_start, collect_end] inside the interval `trained`."""
    return max(0.0, min(times["collect_end"], trained[1]) - max(times["collect_start"], trained[0]))


async def _push(engine: EngineClient, path: Path, version: int) -> float:
    """Load the saved weights on every engine as `version` (the engines pause meanwhile); the seconds it took."""
    t0 = time.perf_counter()
    await engine.update_weights_from_disk(str(path), weight_version=str(version))
    return time.perf_counter() - t0


async def _push_group(sync: WeightSync, policy: Policy, version: int) -> float:
    """Stream the policy's weights to every engine over the group as `version` (`Policy.weight_stream`: one bucket
    gathered, cast and sent at a time, the feature copy fed from the same buckets under FSDP); the seconds it took.
    The stream's steps run on the torch thread, where every collective of the policy runs. The gathers run inside
    the push's bracket, so the engines' pause (and `transfer_s`) covers them: the price of holding one bucket, not
    the model."""
    t0 = time.perf_counter()
    size = sync.bucket_bytes
    count = len(await compute(policy.weight_plan, None, size))
    stream = await compute(policy.weight_stream, size, to_host=sync.backend != "nccl", feed=True)

    async def buckets() -> AsyncIterator[tuple[list[str], list[torch.Tensor]]]:
        while (bucket := await compute(next, stream, None)) is not None:
            yield bucket

    try:
        await sync.push_stream(buckets(), count, version=str(version))
    finally:  # a push that stopped early (or was cancelled): the stream still runs its gathers (ranks in step)
        await asyncio.shield(compute(stream.close))
    return time.perf_counter() - t0


def _due(step: int, every: int, steps: int) -> bool:
    return every > 0 and ((step + 1) % every == 0 or step + 1 == steps)


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    keys = ("reward_mean", "effective_ratio", "predictor_auc", "train_em", "eval_em")
    return {k.replace("_mean", "").replace("effective_", "eff_"): f"{row[k]:.3f}" for k in keys if k in row}


def _append_metrics(out: Path, row: dict[str, Any]) -> None:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(clean, sort_keys=True) + "\n")


def _tree_records(
    out: Path, step: int, batch: StepBatch, trace: TraceStep, conf_hash: str
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The step's tree records (`trainer.dumps`) and, with run.save_trees, its dump; returns the dump's size and the
    seconds it took (`tree_dump_*`), and the records (the trackers' samples come from them)."""
    t0 = time.perf_counter()
    cfg = trace.cfg
    process = trace.allocator.expands
    records = [
        tree_record(t, cfg.advantage, process, {i for k, i in batch.trained if k == idx}, cfg.run.save_tree_features)
        for idx, t in enumerate(batch.trees)
    ]
    if not cfg.run.save_trees:
        return {}, records
    header = {"step": step, "config_hash": conf_hash, "allocator": cfg.allocation.type, "trees": len(records)}
    header["features"] = cfg.run.save_tree_features
    nbytes = write_dump(out / "trees" / f"step_{step:05d}.jsonl.gz", header, records)
    return {"tree_dump_bytes": float(nbytes), "tree_dump_s": time.perf_counter() - t0}, records

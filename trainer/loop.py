"""`trace-train`'s main job: start (or attach to) the env server and the engines, warm-start the
tiny model by SFT if needed, then run TRACE RL steps.

The loop (fits on one screen, helpers below it): rollouts for step t+1 are started before step t's
update when `run.max_staleness >= 1`, so generation and training overlap; with 0 every rollout
uses the weights of the step before it. After each update the weights go to the engines
(save -> /update_weights_from_disk -> cache flushed) with a new weight version, which every node
of later trees records. Every child process and task is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import structlog
import torch
from tqdm import tqdm

from shared.client import EnvClient
from trainer import services
from trainer.compute import compute
from trainer.config import SFTConfig, TrainConfig, config_to_dict
from trainer.engine_client import EngineClient
from trainer.policy import Policy
from trainer.rollout import RolloutConfig, RolloutRunner
from trainer.trace import StepBatch, TraceStep

log = structlog.get_logger("trainer")


async def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    start = latest_checkpoint(out) if resume else None
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2, default=str))
    async with contextlib.AsyncExitStack() as stack:
        env_url = await stack.enter_async_context(services.env_server(cfg, out))
        env = await stack.enter_async_context(EnvClient(env_url, token=cfg.env.token))
        policy = await _initial_policy(cfg, env, out, start)
        weights = await compute(policy.save, out / "weights" / "v0")
        urls = await stack.enter_async_context(services.engines(cfg, weights, out))
        engine = await stack.enter_async_context(EngineClient(urls, max_concurrency=cfg.rollout.max_concurrency))
        await engine.wait_ready(cfg.engine.startup_timeout_s)  # attached engines may still be loading
        runner = RolloutRunner(env, engine, policy.tokenizer, cfg.rollout)
        n_train = _split_size(await env.info(), cfg.env.dataset, cfg.env.train_split)
        if cfg.env.train_limit:
            n_train = min(n_train, cfg.env.train_limit)
        if cfg.model.path is not None:
            _warn_demo_defaults(cfg)
        trace = TraceStep(cfg, policy, runner, n_train)
        first = await compute(_restore, trace, policy, start, out) if start else 0
        version = first

        async def evals() -> dict[str, float]:
            res = await evaluate(env, engine, policy.tokenizer, cfg, limit=cfg.run.eval_size)
            if cfg.run.eval_train:
                limit = min(cfg.run.eval_size, n_train)
                split = cfg.env.train_split
                res.update(await evaluate(env, engine, policy.tokenizer, cfg, limit=limit, split=split, prefix="train"))
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
        reference = await compute(_reference_of, start, cfg)
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


def _reference_of(ckpt: Path, cfg: TrainConfig) -> str | None:
    """The weights a resumed run started from (its KL reference), as recorded in the checkpoint."""
    ref = torch.load(ckpt / "trainer.pt", weights_only=False).get("reference_model")
    gone = ref is None or (Path(ref).is_absolute() and not (Path(ref) / "config.json").exists())  # else a hub id
    if cfg.optim.kl_coef > 0 and gone:
        raise FileNotFoundError(
            f"--resume with optim.kl_coef={cfg.optim.kl_coef}: the run's KL reference (the weights it started "
            f"from) {ref or '(not recorded in ' + str(ckpt) + ')'} is not there; restore that folder, or resume "
            "with --set optim.kl_coef=0"
        )
    return ref


async def run_sft(cfg: TrainConfig, env: EnvClient, base: Path, dest: Path) -> None:
    """SFT warm start of `base` on oracle trajectories played through the env server; saved at `dest`."""
    from trainer.sft import oracle_examples

    s = cfg.sft
    policy = await compute(_policy, base, dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, kl_coef=0.0)))
    examples = await oracle_examples(
        env,
        policy.tokenizer,
        dataset=cfg.env.dataset,
        split=cfg.env.train_split,
        count=s.max_examples,
        max_context_tokens=cfg.rollout.max_context_tokens,
        seed=cfg.model.tiny_seed,
        think=s.think,
    )
    rng = random.Random(cfg.model.tiny_seed)
    steps = s.epochs * math.ceil(len(examples) / s.batch_size)
    bar = tqdm(total=steps, desc="sft warm start", dynamic_ncols=True)
    k = 0
    for _ in range(s.epochs):
        for chunk in _shuffled_batches(examples, s.batch_size, rng):
            lr = sft_lr(k, steps, s)
            policy.set_lr(lr)
            loss = await compute(
                policy.sft_update, [e.input_ids for e in chunk], [e.loss_mask for e in chunk], s.micro_batch_size
            )
            k += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    await compute(policy.save, tmp)
    tmp.rename(dest)
    log.info("sft warm start saved", dir=str(dest), examples=len(examples), steps=steps)


def sft_lr(k: int, steps: int, s: SFTConfig) -> float:
    """SFT learning rate at step k of `steps`: linear warmup, constant, then a linear decay to 0 over the last
    `decay_frac` of the steps. Copying names (what success hinges on) is learned late, so the rate stays up
    until then; the final decay is worth a lot (teacher-forced episode accuracy ~0.5 -> ~0.7 on train)."""
    lr = s.lr * min(1.0, (k + 1) / max(s.warmup_steps, 1))
    start = (1.0 - s.decay_frac) * steps
    if s.decay_frac > 0 and k >= start:
        lr *= max(0.0, (steps - k) / (s.decay_frac * steps))
    return lr


def _shuffled_batches(examples: list[Any], batch_size: int, rng: random.Random) -> list[list[Any]]:
    """Plain shuffled batches. Length-bucketed batches padded less (1.6 vs 2.2 s a step) but left the tiny
    model's SFT far behind (sampled success ~2% vs ~7% after the same steps): a bucket is mostly one
    question type, and at this learning rate the steps pull in turns."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    return [[examples[j] for j in order[i : i + batch_size]] for i in range(0, len(order), batch_size)]


async def evaluate(
    env: EnvClient,
    engine: EngineClient,
    tokenizer: Any,
    cfg: TrainConfig,
    *,
    limit: int,
    split: str | None = None,
    prefix: str = "eval",
) -> dict[str, float]:
    """Greedy EM/F1 on the first `limit` questions of `split` (default: the eval split), through the same agent
    loop: {"<prefix>_em", "<prefix>_f1"}."""
    split = split or cfg.env.eval_split
    greedy = RolloutConfig(**{**vars(cfg.rollout), "temperature": 0.0})
    runner = RolloutRunner(env, engine, tokenizer, greedy)
    n = min(limit, _split_size(await env.info(), cfg.env.dataset, split))

    async def one(i: int) -> tuple[float, float]:
        tree = await runner.new_tree(cfg.env.dataset, split, i)
        [leaf] = await runner.expand(tree, 0, 1)
        engine.release(tree.prompt_id)
        info = tree.nodes[leaf].info
        return float(info.get("em", 0.0)), float(info.get("f1", 0.0))

    res = await asyncio.gather(*(one(i) for i in range(n)))
    return {f"{prefix}_em": sum(r[0] for r in res) / max(n, 1), f"{prefix}_f1": sum(r[1] for r in res) / max(n, 1)}


def _split_size(info: Any, dataset: str, split: str) -> int:
    sizes = {d.name: d.splits for d in info.datasets}
    if dataset not in sizes or split not in sizes[dataset]:
        raise ValueError(f"the env server has no {dataset}/{split}; it serves {sizes}")
    return sizes[dataset][split]


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


def save_checkpoint(out: Path, next_step: int, policy: Policy, trace: TraceStep) -> Path:
    """checkpoints/step_XXXXX/{model/, optimizer.pt, trainer.pt}; written to a tmp folder then renamed."""
    d = out / "checkpoints" / f"step_{next_step:05d}"
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save(tmp / "model")
    torch.save(policy.optimizer_state(), tmp / "optimizer.pt")
    state = {
        "next_step": next_step,
        "reference_model": policy.reference,
        "trace": trace.state_dict(),
        "python_rng": random.getstate(),
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, tmp / "trainer.pt")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted(p for p in (out / "checkpoints").glob("step_*") if not p.name.endswith(".tmp"))
    if not ckpts:
        raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    return ckpts[-1]


def _restore(trace: TraceStep, policy: Policy, ckpt: Path, out: Path) -> int:
    """Load trainer state from `ckpt`; drop metrics rows of steps after it. Returns the next step."""
    policy.load_optimizer_state(torch.load(ckpt / "optimizer.pt", weights_only=False))
    state = torch.load(ckpt / "trainer.pt", weights_only=False)
    trace.load_state_dict(state["trace"])
    random.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    nxt = int(state["next_step"])
    path = out / "metrics.jsonl"
    if path.exists():
        rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < nxt]
        path.write_text("".join(r + "\n" for r in rows))
    log.info("resumed", checkpoint=str(ckpt), next_step=nxt)
    return nxt


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
    panels = [
        ("reward", ["reward_mean", "train_em", "eval_em"]),
        ("contrast", ["effective_ratio", "nonzero_adv_token_frac"]),
        ("predictor", ["predictor_auc", "predictor_brier"]),
        ("tokens", ["generated_tokens", "prefill_tokens", "cached_prefill_tokens"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, keys) in zip(axes, panels, strict=True):
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

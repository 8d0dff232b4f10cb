"""The trainer's one typed config: sections of documented fields, built by the project's one config mechanism
(`shared/config.py`).

Sources, later wins: field defaults (= the embedded CPU demo) < `--config FILE.toml` (one table per
section: `[run]`, `[model]`, `[engine]`, `[env]`, `[rollout]`, `[allocation]`, `[predictor]`,
`[advantage]`, `[optim]`, `[sft]`) < `$TRACE_ENV_TOKEN` < `--set section.field=value` < flags: every field
as `--section.field VALUE`, and the short aliases `--steps`, `--name`, `--output-dir`, `--allocator`,
`--model`, `--engine`, `--engine-url`, `--env-url`, `--log-level`. Unknown keys are errors.
`TrainConfig.validate()` holds every cross-field check, in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from shared import config as shared_config
from shared.logging import level_number
from trainer.algo.advantages import AdvantageConfig
from trainer.algo.allocation import AllocationConfig, make_allocator, uniform_group
from trainer.algo.predictor import PredictorConfig
from trainer.algo.rollout import RolloutConfig
from trainer.engines.config import WEIGHT_SYNC, EngineConfig
from trainer.learner.config import ModelConfig, OptimConfig
from trainer.tracking import check_report_to


@dataclass
class RunConfig:
    name: Annotated[str, tyro.conf.arg(aliases=("--name",))] = "cpu-demo"
    """Run name; outputs go to `output_dir` (default runs/<name>)."""
    output_dir: Annotated[str | None, tyro.conf.arg(aliases=("--output-dir",))] = None
    """Where metrics.jsonl, checkpoints, trees and plots go."""
    steps: Annotated[int, tyro.conf.arg(aliases=("--steps",))] = 30
    """RL steps."""
    seed: int = 0
    """Seeds data order, sampling rngs, the predictor and the tiny model."""
    prompts_per_step: int = 16
    """Prompts a step trains on at the baseline's group size: uniform GRPO takes this many a step
    (allocation.leaf_budget // prompts_per_step rollouts each, unless allocation.group_size says otherwise)."""
    pool_size: int = 64
    """B: candidate prompts an active stage 1 (trace, root-only) values each step, drawn from the data stream; it
    funds the best and gives the rest back to the stream (they come first next step). A few times the prompts a
    step can fund (4 x prompts_per_step by default; root_budget / m_min is the most stage 1 can fund), so that
    stage 1 really chooses. Capped by the training split (env.train_limit). Allocators with a uniform stage 1
    (uniform, random-node) draw only the prompts they use."""
    max_staleness: int = 0
    """Rollouts for step t+1 may start while step t trains when >= 1 (0 = fully on-policy)."""
    eval_every: int = 5
    """Evaluate on the eval split every this many steps (0 = never; always once at the end when > 0)."""
    eval_size: int = 200
    """Questions of the eval split per evaluation (200 = all of the synthetic world's dev questions)."""
    eval_train: bool = True
    """Also evaluate (greedy) on the first eval_size questions RL trains on (within env.train_limit), as
    train_em/train_f1: the policy's progress on its own questions, which reward_mean does not show cleanly
    because the allocator picks the prompts it samples."""
    eval_before_train: bool = True
    """Evaluate once before the first update too (step 0's row gets eval_em_before, train_em_before, ...)."""
    save_every: int = 10
    """Checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """Keep the last this many checkpoints, deleting older ones once a new one is complete (0 = keep all)."""
    save_trees: bool = True
    """Write every step's rollout trees to trees/step_XXXXX.jsonl.gz (`trainer.dumps`: each node's turn, values,
    advantages, round and whether it was trained), off the event loop. ~0.03 MB a step for the demo, ~4.6 MB for
    configs/qwen3-8b-hotpotqa.toml's 1,536 leaves (bench/bench_tree_dump.py)."""
    tracker_samples: int = 2
    """Trees a step whose leaves' trajectories go to the trackers of `report_to` as a table of text (0 = none)."""
    save_tree_features: bool = False
    """Also put each node's predictor input (hidden state + structural features: ~4k floats a node at 8B) in the
    tree dumps."""
    plot: bool = True
    """Write PNG plots of the metrics at the end."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get every metrics row and the config besides metrics.jsonl: "wandb",
    "tensorboard" (several allowed; [] or "none" = metrics.jsonl only). Needs the `track` extra."""
    wandb_project: str = "trace"
    """Weights & Biases project (when report_to has "wandb"; WANDB_MODE=offline runs without a network)."""
    log_level: Annotated[str, tyro.conf.arg(aliases=("--log-level",))] = "warning"
    """debug, info, warning or error (structlog; JSON lines when stderr is not a TTY)."""


@dataclass
class EnvConfig:
    urls: Annotated[list[str], tyro.conf.arg(aliases=("--env-url",))] = field(default_factory=list)
    """Env server URLs: one, or several replicas (`--env-url A --env-url B`; `shared.replicas.EnvPool`: new episodes
    go to the least-loaded replica, a tree stays on its replica). Empty = start `trace-env serve` as a child process
    on the synthetic world. Replicas must serve the same corpus and datasets (checked at start)."""
    token: str | None = None
    """Bearer token for the env server (or env TRACE_ENV_TOKEN / TRACE_AUTH_TOKEN)."""
    coalesce: bool = True
    """Send the env calls made together (one turn of the event loop: a round's forks, the branches whose
    generations came back at once) as one `POST /v1/batch` (`EnvClient(coalesce=True)`); false: one request each."""
    patience_s: float = 300.0
    """How long new episodes wait for an env server to come back when none is up (a warning is logged every 10 s
    while they wait); then the run stops with the servers' last errors. A tree whose replica goes away is redone."""
    redo_attempts: int = 2
    """Times one step redoes a prompt's rollout tree that lost its env state (its replica died, a call timed out);
    after that the prompt is dropped for the step and a fresh prompt takes its leaves. Either way the step keeps
    exactly allocation.leaf_budget leaves and no half-finished tree reaches the update (metrics: env_failures,
    trees_redone, trees_dropped, leaves_lost)."""
    dataset: str = "synthetic"
    train_split: str = "train"
    train_limit: int = 0
    """RL on the first N questions of the train split only (0 = all of it), so that questions come back every
    N / prompts_per_step steps, as epochs do in a long run. 0 by default: what the warm start gets wrong is a
    decision that carries over to unseen questions, so RL on all of them moves dev EM (README)."""
    eval_split: str = "dev"
    max_turns: int = 4
    """Turns per episode asked of the env server (at most its own --max-turns: checked against /v1/info at start)."""
    topk: int = 1
    """Passages per search when the env server is started here. The synthetic world's retrieval is precise (an
    oracle query finds its passage at rank 1), and one passage instead of Search-R1's three keeps the tiny demo's
    contexts short: its SFT warm start runs in ~5 min instead of ~10 at 2."""
    synthetic_size: int = 300
    """Size of the synthetic world when the env server is started here."""
    heldout_frac: float = 0.0
    """Share of the synthetic world's people, organisations and works held out of every train question (dev/test
    questions start at them: `trace-world --heldout-frac`), so dev EM measures a skill, not memorised facts. 0 = the
    built-in world's split (dev/test questions about entities train questions also cover)."""
    prompt_template: str | None = (
        "Answer the question. Look things up with <search> query </search>; give the answer as "
        "<answer> answer </answer>.\nQuestion: {question}"
    )
    """User prompt of an env server started here (None = its Search-R1-style default). The default is short:
    ~30 tokens instead of ~130, a third of the tiny demo's sequence length."""


Flaw = Literal["early_answer"]
"""Flawed warm-start strategies (`trainer.sft.flawed_actions` plays them)."""


@dataclass
class SFTConfig:
    enabled: bool = True
    """Warm-start the tiny model by SFT on oracle trajectories (cached), so the action format is known."""
    think: bool = False
    """Oracle actions carry a short <think> text (False: bare <search>/<answer>, fewer tokens to learn)."""
    epochs: int = 5
    """Passes over the examples: 5 epochs of 1,500 are 470 steps, ~5 min on 2 cores at env.topk 1. With the
    context loss (`context_weight`) that is enough to copy names (oracle-only warm start: greedy dev EM 0.805)."""
    lr: float = 3e-3
    batch_size: int = 16
    micro_batch_size: int = 4
    """Sequences per forward/backward within a batch (length-sorted; the gradient is the batch's either way)."""
    max_examples: int = 1500
    warmup_steps: int = 20
    context_weight: float = 1.0
    """Loss weight of the prompt and observation tokens (the agent's own tokens weigh 1; 0 = actions only): next-token
    prediction on the question and the retrieved passages, as a base model's pretraining would give, where a name is
    often copied from just before (a passage's title after the query that found it). It is what teaches the tiny
    model to copy names: oracle-only warm start, seed 0, greedy EM on all 200 dev questions 0.15 at 0, 0.805 at 1."""
    flawed_frac: float = 0.7
    """Share of the bridge questions whose warm-start trajectory is the flawed strategy `flaw` instead of the oracle
    (0 = oracle only). The flaw is a *decision* RL can fix and that carries over to unseen questions: warm-started
    at 0.7, the tiny model answers 113 of the 120 dev bridge questions before their last hop (greedy; dev EM
    0.215, against 0.805 from the oracle-only warm start; measured before issue 13, it is 0.185 today), and GRPO
    learns to search on."""
    flaw: Flaw = "early_answer"
    """Which flawed strategy (`trainer.sft.FLAWS`): early_answer = answer with the entity just read, one or more
    hops early."""
    decay_frac: float = 0.2
    """The rate decays linearly to 0 over this last fraction of the steps (constant before, after warmup)."""


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    allocation: AllocationConfig = field(
        default_factory=lambda: AllocationConfig(leaf_budget=64, root_budget=32, m_max=6)
    )  # the CPU demo: 64 leaves a step, 32 roots + 32 continuations for the allocators that expand
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or Path("runs") / self.run.name)

    def validate(self) -> TrainConfig:
        """Cross-section checks; raise ValueError saying what to change."""
        make_allocator(self.allocation.type)  # an unknown name: a ValueError naming the choices
        if self.engine.type not in ("cpu", "sglang", "url"):
            raise ValueError(f"engine.type must be cpu, sglang or url, got {self.engine.type!r}")
        if self.engine.type == "url" and not self.engine.urls:
            raise ValueError("engine.type 'url' needs engine.urls (or --engine-url URL)")
        if self.engine.urls and self.engine.type == "sglang":
            raise ValueError(
                f"engine.urls {self.engine.urls} attaches to running engines, engine.type 'sglang' launches one: "
                "drop one of them"
            )
        if self.engine.gpus and (self.engine.urls or len(self.engine.gpus) % self.engine.num_servers):
            raise ValueError(
                f"engine.gpus {self.engine.gpus} is split evenly among the {self.engine.num_servers} launched engines "
                "(engine.num_servers); give a multiple of it, and none when attaching by engine.urls"
            )
        if self.engine.colocate and self.engine.urls:
            raise ValueError("engine.colocate places engines this run launches; with engine.urls it launches none")
        if self.engine.weight_sync not in WEIGHT_SYNC or self.engine.sync_bucket_mb < 1:
            raise ValueError(
                f"engine.weight_sync must be one of {WEIGHT_SYNC} (got {self.engine.weight_sync!r}) and "
                f"engine.sync_bucket_mb >= 1 (got {self.engine.sync_bucket_mb})"
            )
        check_report_to(self.run.report_to)
        if self.env.patience_s < 0 or self.env.redo_attempts < 0:
            raise ValueError(
                f"env.patience_s ({self.env.patience_s}) and env.redo_attempts ({self.env.redo_attempts}) must be >= 0"
            )
        if not 0.0 <= self.env.heldout_frac < 1.0:
            raise ValueError(f"env.heldout_frac must be in [0, 1), got {self.env.heldout_frac}")
        if self.model.path is not None and Path(self.model.path).expanduser().exists():  # else a hub id
            self.model.path = str(Path(self.model.path).expanduser().resolve())
        for name, urls in (("engine.urls (--engine-url)", self.engine.urls), ("env.urls (--env-url)", self.env.urls)):
            bad = [u for u in urls if not u.startswith(("http://", "https://"))]
            if bad:
                raise ValueError(f"{name} must start with http:// or https://, got {bad}")
        if self.engine.num_servers < 1:
            raise ValueError(f"engine.num_servers must be >= 1, got {self.engine.num_servers}")
        if level_number(self.run.log_level) is None:  # what setup_logging takes
            raise ValueError(f"run.log_level must be one of {LOG_LEVELS} (or another logging level name), got "
                             f"{self.run.log_level!r}")  # fmt: skip
        if self.run.steps < 0 or self.run.prompts_per_step < 1:
            raise ValueError(f"run.steps={self.run.steps} must be >= 0 and prompts_per_step >= 1")
        self._check_leaf_budget()
        sft = self.sft
        if not 0.0 <= sft.decay_frac <= 1.0 or min(sft.epochs, sft.batch_size, sft.micro_batch_size) < 1:
            raise ValueError(
                f"sft: decay_frac={sft.decay_frac} must be in [0, 1], and epochs={sft.epochs}, "
                f"batch_size={sft.batch_size}, micro_batch_size={sft.micro_batch_size} >= 1"
            )
        if not 0.0 <= sft.flawed_frac <= 1.0 or sft.context_weight < 0:
            raise ValueError(f"sft: flawed_frac={sft.flawed_frac} must be in [0, 1], context_weight >= 0")
        if self.env.train_limit < 0:
            raise ValueError(f"env.train_limit must be >= 0 (0 = the whole split), got {self.env.train_limit}")
        if self.run.max_staleness < 0:
            raise ValueError(f"run.max_staleness must be >= 0, got {self.run.max_staleness}")
        if self.rollout.max_new_tokens + self.rollout.min_turn_tokens > self.rollout.max_context_tokens:
            raise ValueError("rollout.max_context_tokens must exceed max_new_tokens + min_turn_tokens")
        if 0 < self.optim.micro_batch_tokens < self.rollout.max_context_tokens:
            raise ValueError(
                f"optim.micro_batch_tokens={self.optim.micro_batch_tokens} is below rollout.max_context_tokens="
                f"{self.rollout.max_context_tokens}: a full-length sample would exceed the memory budget; raise it (or "
                "0 = micro-batches of optim.micro_batch_size sequences)"
            )
        return self

    def _check_leaf_budget(self) -> None:
        """Refuse settings under which an allocator cannot spend exactly allocation.leaf_budget rollouts a step
        (trainer/algo/allocation.py, "The leaf budget"); each message names the field to change."""
        a, run = self.allocation, self.run
        alloc = make_allocator(a.type)
        stage1 = alloc.stage1_budget(a)
        if run.pool_size < 1:
            raise ValueError(f"run.pool_size must be >= 1, got {run.pool_size}")
        if alloc.expands and a.root_budget > a.leaf_budget:
            raise ValueError(
                f"allocation.root_budget {a.root_budget} > allocation.leaf_budget {a.leaf_budget}: stage 1 alone "
                "would spend more than the step's leaves; lower root_budget or raise leaf_budget"
            )
        if alloc.selects:
            if stage1 < max(a.m_min, 1):
                raise ValueError(
                    f"allocation.{'root_budget' if alloc.expands else 'leaf_budget'} {stage1} < allocation.m_min "
                    f"{a.m_min}: stage 1 could fund no prompt; raise it or lower m_min"
                )
            if run.pool_size * a.m_max < a.leaf_budget:
                raise ValueError(
                    f"run.pool_size {run.pool_size} x allocation.m_max {a.m_max} = {run.pool_size * a.m_max} < "
                    f"allocation.leaf_budget {a.leaf_budget}: {a.type} cannot spend the leaf budget on its candidate "
                    "pool; raise run.pool_size (or allocation.m_max)"
                )
            if run.pool_size < run.prompts_per_step:
                raise ValueError(
                    f"run.pool_size {run.pool_size} < run.prompts_per_step {run.prompts_per_step}: stage 1 would "
                    "choose among fewer prompts than a step trains on; raise run.pool_size (e.g. 4 x prompts_per_step)"
                )
        else:
            g = uniform_group(stage1, a.group_size, run.prompts_per_step)
            field_ = "allocation.group_size" if a.group_size else f"{stage1} // run.prompts_per_step"
            if g < max(a.m_min, 1) or g > stage1:
                raise ValueError(
                    f"{a.type}'s group size {g} ({field_}) must be in [max(allocation.m_min, 1), {stage1}] for a "
                    f"uniform stage 1 spending {stage1}; set allocation.group_size, or change run.prompts_per_step"
                )


ENV_VARS = {"TRACE_ENV_TOKEN": "env.token", "TRACE_AUTH_TOKEN": "env.token"}
"""Environment variables the trainer reads (the first one set wins; TRACE_AUTH_TOKEN is the older name)."""


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class RunError(ValueError):
    """Bad input found once a run has begun, where the config alone could not tell: an env server that answers
    nothing, a split it does not serve, no checkpoint to resume. `trace-train` prints it and exits 2, no traceback."""


class RunFileError(RunError, FileNotFoundError):
    """A file or folder the run needs is not there (a checkpoint to resume, the KL reference it recorded)."""


def check_local_paths(cfg: TrainConfig) -> None:
    """What a run needs on this machine, checked before it starts anything (the CLI calls it; a config stays loadable
    on a machine without the model): a model folder that is one, an output folder that is not a file. Raises
    ValueError saying what to fix."""
    path = cfg.model.path
    if path is not None and (folder := Path(path).expanduser()).exists():
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"model.path {path} holds no config.json: give a Hugging Face model folder (or a checkpoint's "
                "model/, e.g. runs/NAME/checkpoints/step_00030/model)"
            )
    elif path is not None and _looks_local(path):
        raise ValueError(f"model.path {path}: no such folder (a hub id is written org/name)")
    if cfg.output_dir.exists() and not cfg.output_dir.is_dir():
        raise ValueError(f"the output folder {cfg.output_dir} is a file: give run.output_dir a folder")


def _looks_local(path: str) -> bool:
    """A model path written as a local one (absolute, ./ ../ ~/, or more than one '/'), not a hub id `org/name`."""
    return path.startswith(("/", "./", "../", "~", ".")) or path.count("/") > 1


def load_train_config(path: str | Path | None = None, sets: list[str] | None = None) -> TrainConfig:
    """Defaults < TOML file < $TRACE_ENV_TOKEN < `section.field=value` items, validated. For code and tests; the
    command line goes through `trainer.cli` (the same sources, then flags)."""
    cfg = shared_config.load_config(TrainConfig, path, env_vars=ENV_VARS, sets=sets or [])
    return cfg.validate()


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)

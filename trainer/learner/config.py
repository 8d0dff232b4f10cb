"""The learner's config sections (`[model]`, `[optim]`), composed by `trainer.config.TrainConfig` on top."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import tyro

TRAIN_DTYPES = ("float32", "float64")
"""`model.dtype`'s values: names of torch dtypes (the policy trains in `getattr(torch, name)`)."""


@dataclass
class ModelConfig:
    path: Annotated[str | None, tyro.conf.arg(aliases=("--model",))] = None
    """A Hugging Face model folder (e.g. a Qwen3 checkpoint). None = the tiny model, built if missing."""
    tiny_dir: str | None = None
    """Where the tiny model is built/cached (default $TRACE_CACHE_DIR/tiny-model-s<tiny_seed>)."""
    tiny_seed: int = 0
    """Seed of the tiny model and of its SFT warm start. Kept apart from run.seed, so runs of several seeds
    (and every allocator of a comparison) start from one and the same warm-started checkpoint."""
    dtype: str = "float32"
    """The dtype the policy trains in (its master weights, logprobs and loss): "float32", or "float64" for exact
    comparisons (tests/test_distributed.py: in float64 a 2-rank update's parameters differ from the 1-rank one's by
    at most 2.2e-16 after an update of 1e-3, where in float32 the order of a reduction alone moved them by ~2e-5).
    Half precision is `mixed_precision`'s."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu" or "cuda"."""
    mixed_precision: str = "auto"
    """accelerate's mixed precision: "auto" (bf16 on CUDA, no on CPU), "no", "bf16", "fp16"."""
    gradient_checkpointing: bool = False
    logprob_chunk: int = 1024
    """Positions whose full-vocabulary logits exist at once when the policy takes token logprobs: its LM head
    (`trainer.learner.loss.LogprobHead`) computes them chunk by chunk and recomputes each chunk in backward, never
    the whole [tokens x vocabulary] matrix (Qwen3's 151,936 columns: ~1.9 GB of transient at 1,024 positions)."""
    save_dtype: str = "auto"
    """dtype of the weights written for the engines: "auto" = the dtype the model was stored in (its config.json's
    `dtype`: bfloat16 for Qwen3, float32 for the tiny model), or "bfloat16", "float16", "float32". The policy trains
    in `dtype` either way; a launched SGLang server gets the same dtype as --dtype (never its `auto` guess)."""
    weight_bucket_mb: int = 512
    """Weights leave the policy (a save for the engines or a checkpoint's export, a push over the weight group, the
    feature copy under FSDP) as a stream of buckets of this many MB in `save_dtype`: each tensor gathered whole on
    the training device (under FSDP an all-gather of its shards), cast there and moved to rank 0's host, one bucket
    at a time (a bigger tensor goes alone): rank 0 never holds more than one bucket of them."""

    def __post_init__(self) -> None:  # a section's own check, run however the section is built
        if self.dtype not in TRAIN_DTYPES:
            raise ValueError(f"model.dtype must be one of {TRAIN_DTYPES}, got {self.dtype!r}")
        if self.logprob_chunk < 1:
            raise ValueError(f"model.logprob_chunk must be >= 1 (positions a chunk), got {self.logprob_chunk}")
        if self.weight_bucket_mb < 1:
            raise ValueError(f"model.weight_bucket_mb must be >= 1, got {self.weight_bucket_mb}")


LOSS_AGG = ("token-mean", "seq-mean-token-mean")


@dataclass
class OptimConfig:
    lr: float = 5e-5
    """Policy learning rate, for the ~3M-parameter demo model (Qwen3-class models want ~1e-6). From the default
    warm start (greedy dev EM 0.215, all 200 dev questions), GRPO without KL: 0.30 at step 2 and 0.435 at step 5
    at 5e-5; 0.47 at step 2, then flat (0.47-0.48 to step 11) at 2e-4: the slower rate draws a learning curve
    (measured before issue 13; the warm start is 0.185 today, and the CPU demo at this rate reaches 0.515 in 30
    steps, docs/results.md)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 8
    """At most this many sequences a forward/backward; gradients accumulate over the step's samples."""
    micro_batch_tokens: int = 0
    """At most this many padded tokens (sequences x the longest of them) a forward/backward on a rank, as verl's
    dynamic batch size: a rank's share, sorted by length, is packed greedily under both limits, so a micro-batch
    of short sequences holds many and a long one few; every rank still runs the same number of micro-batches.
    0 = count sequences only. Activation memory follows this budget, not the sequence count: set it, and a large
    micro_batch_size, for long multi-turn contexts (configs/qwen3-8b-hotpotqa.toml; a sequence longer than the
    budget trains alone)."""
    share_prefixes: bool = False
    """Prefix-shared updates (trainer/learner/packing.py): each prompt's samples in a micro-batch packed into one
    row of unique tokens with a tree attention mask, so a prompt or turn its samples share is computed once, not
    once a sample. A prompt's samples share micro-batches (at most micro_batch_size samples; micro_batch_tokens
    then counts packed tokens: rows x the longest row). The same loss; its gradients agree with the unpacked
    update's to float32 rounding (Qwen3's RMSNorm computes in float32). On several ranks a prompt's runs go whole
    to a rank, balanced by packed tokens.
    Off by default: what it saves depends on how much the samples share (bench/bench_packed_update.py)."""
    clip_eps: float = 0.2
    clip_eps_high: float | None = 0.28
    """Asymmetric upper clip (DAPO's clip-higher); None = clip_eps."""
    tis_cap: float = 2.0
    """Truncated importance sampling cap for engine/trainer logprob mismatch."""
    kl_coef: float = 0.0
    """k3 KL to the policy the run started from (0 = no reference model kept; it costs one more forward pass).
    0 on the demo: its reference is a warm start that answers early on purpose, and KL 0.1 pulled GRPO back
    towards it (at lr 2e-4, dev questions answered early 0.565 -> 0.04 at step 4, back to 0.23 at step 14; dev
    EM 0.505 -> 0.425), where without KL they stayed at 0.07-0.10. Search-R1 uses 1e-3 on Qwen2.5; DAPO uses 0."""
    ppo_epochs: int = 1
    """Passes over each step's samples (1 = on-policy, the PPO ratio is 1 and clipping is idle)."""
    loss_agg: str = "token-mean"
    """How token losses add up (verl's names): "token-mean" = every trained token counts once (DAPO);
    "seq-mean-token-mean" = each root-to-leaf sample's token weights are divided by its number of trained tokens
    (GRPO's original), so a long failure weighs no more than a short success; in a group without branching the
    leaf advantages, which sum to zero, then also sum to zero in the gradient. Shared prefixes keep their
    1 / n(y) tree weights within each sample either way (the logged policy_tokens is then the scaled sum)."""

    def __post_init__(self) -> None:  # a section's own check, run however the section is built
        if self.micro_batch_size < 1 or self.micro_batch_tokens < 0:
            raise ValueError(
                f"optim.micro_batch_size must be >= 1 and optim.micro_batch_tokens >= 0 (0 = no token budget), got "
                f"{self.micro_batch_size} and {self.micro_batch_tokens}"
            )
        if self.loss_agg not in LOSS_AGG:
            raise ValueError(f"optim.loss_agg must be one of {LOSS_AGG}, got {self.loss_agg!r}")


def uses_cpu(model: ModelConfig) -> bool:
    """Whether the policy trains on CPU: model.device "cpu", or "auto" without CUDA."""
    if model.device == "cpu":
        return True
    import torch  # here: parsing a config needs no torch

    return model.device == "auto" and not torch.cuda.is_available()

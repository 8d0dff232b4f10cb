"""The memory plan: what training a Qwen3 model with this trainer holds per GPU, on paper, for Qwen3-8B and Qwen3-14B
under FSDP2 (4, 6 and 8 GPUs) and DDP, and the same formulas checked against what the code allocates on the tiny model.

    python bench/memory_plan.py --out runs/memory_plan.json            # the tables + JSON (a second)
    python bench/memory_plan.py --check --out runs/memory_plan.json    # + the checks on the tiny model (CPU, ~3 min)

Bytes per rank, by holder (N parameters; n ranks sharding them, n = 1 under DDP; GB = 1e9 bytes):
- params: the float32 master weights (`trainer.learner.policy.Policy` loads the model in float32): 4N / n.
- grads: float32, 4N / n, kept across the micro-batches of a step (gradient accumulation).
- adam: torch AdamW's exp_avg + exp_avg_sq, float32, 8N / n. Its `step` counters (one float32 scalar a parameter
  tensor) sit on the host unless AdamW is capturable or fused, so they count in the CPU check, not on the GPU.
- ddp_buckets (DDP only): DDP's flat gradient buckets, a second float32 copy of every gradient (4N), unless
  gradient_as_bucket_view=True (False in accelerate's DistributedDataParallelKwargs, which the trainer does not set).
- reference (optim.kl_coef > 0): the frozen KL copy, bf16 under mixed precision: 2N replicated, as the code makes it
  (not supported under FSDP yet), or 2N / n if it were sharded.
- features (run.max_staleness >= 1): `FeatureModel`. On one GPU and under DDP a float32 deep copy of the model, 4N
  on rank 0; under FSDP a copy in the engines' dtype (bf16, 2N) on rank 0's GPU, built empty and filled bucket by
  bucket from the weight stream (issue 23; before, from the last save's weights kept whole in rank 0's host memory);
  4N / n or 2N / n if it were sharded. Its forward runs while the policy trains, so its transient (`feature_forward`) can
  land on top of the training peak: `_hidden_states` keeps the last hidden state only (a hook on the final norm) and
  builds no KV cache, for `hidden_at`'s batch of 16 sequences (before d7e0a8d it kept every layer's hidden state and
  a KV cache: 70.9 GB for 8B).
- engines' weights (`Policy.weight_stream`, for `save`, the group push and the FSDP feature copy; issue 23): one
  bucket (model.weight_bucket_mb, 512 MB) in rank 0's host memory at a time, or the largest tensor alone when it is
  bigger (Qwen3-8B's embedding: 1.24 GB in bf16); each tensor is gathered whole and cast on the device first (its
  float32 size, a transient there). Before issue 23: 2N of bf16 weights plus the full float32 state dict gathered to
  rank 0's host (4N) while cast, and under FSDP the bf16 weights kept there for the feature model (2N): the
  `before_issue_23` row.

Activations of one micro-batch (B sequences of T tokens; K = positions whose logits are computed: `sequence_logprobs`
runs the LM head only where some row of the micro-batch has a trained next token, the union over rows, so
K <= min(T - 1, B x trained tokens a row)). What autograd saves, per token and decoder layer, from reading
transformers' Qwen3 under autocast (H hidden, Qd = heads x head_dim, Kd = kv heads x head_dim, I MLP width; r = 4
with float32 parameters, as on one GPU and under DDP; r = 2 under FSDP2, whose MixedPrecisionPolicy gathers bf16
parameters, so the residual stream is bf16):
- each RMSNorm: its float32 input (or float32 upcast), the normalised value (float32, or its bf16 cast), 1/rms:
  4H + rH + 4, twice a layer;
- the bf16 inputs of q/k/v and gate/up: autocast casts the float32 norm output once per linear, 5 x 2H (r = 4); the
  bf16 norm output is shared, 2 x 2H (r = 2);
- q_norm and k_norm on the bf16 projections: 6Qd + 4 heads + 6Kd + 4 kv heads;
- SDPA (no mask, causal, GQA in the kernel): q, k, v, its output (which is also o_proj's input), logsumexp:
  4Qd + 4Kd + 4 heads;
- the SwiGLU MLP: gate output, silu output, up output, product, bf16: 8I.
So 26H + 10Qd + 10Kd + 8I + 8 heads + 4 kv heads + 8 (r = 4), 16H + ... (r = 2): 256,296 bytes a token a layer
for Qwen3-8B (r = 4). Besides the layers: the final norm (4H + rH + 4 a token), RoPE's cos/sin (2 T head_dim r),
the LM head's bf16 input (2H a kept position) and the logits in float32, 4BKV (accelerate's forward wrapper
converts the model's outputs to float32 on one GPU and under DDP; it does not wrap an FSDP2 model, whose bf16 logits
`sequence_logprobs` copies to float32 row by row; a second 4BKV when the sampling temperature is not 1). With float32
parameters the bf16 casts of the weights are saved too (2 bytes a linear weight: autocast caches them for the whole
forward, and each linear saves its cast for backward). With gradient checkpointing (transformers' non-reentrant
checkpoint around every decoder layer) a layer keeps only its input, rH a token, and one layer is recomputed at a
time in backward; the LM head and the logits are outside the checkpoints.

Peak (per rank) = the states above + the largest of these moments (the activation peak):
- forward end: held activations + autocast's bf16 weight casts (r = 4) + the bf16 logits while their float32 copy is
  made (2BKV) (no KV cache: `sequence_logprobs` passes use_cache=False since d7e0a8d);
- the reference forward (kl_coef > 0): held activations + its bf16 logits;
- head backward: held activations + 12BKV with accelerate's wrapper (`sequence_logprobs` takes each row's
  log-softmax from a view `logits[b]` of one float32 tensor, whose backward is a full [B, K, V] float32 gradient per
  row, summed by autograd), max(12KV, 4BKV) without it (FSDP2): fitted to the check's measurements (B = 1, 2, 4, 8);
- one checkpointed layer recomputed in backward: held activations less the logits + that layer's saved tensors +
  (r = 4) its weights cast again;
- optimizer step: foreach AdamW's one temporary the size of the parameters (4N / n).
Under FSDP2 add the gather allowance: the tail unit (final norm + LM head: accelerate keeps it unsharded from the end
of forward to the start of backward) in bf16 with its unsharded bf16 gradient, and one prefetched decoder layer.

The checks (`--check`) build the tiny model (tools/tiny_model.py, offline), construct `Policy` on the CPU with bf16
autocast, run one real `rl_update`, and compare (tests/test_memory_plan.py asserts the first one):
- the states: bytes of parameters, `.grad`s, optimizer state, the KL reference and `FeatureModel`, exactly;
- the bytes autograd saves for one micro-batch (a saved_tensors_hooks count of distinct storages) against the
  activation formula, at the tiny shape with float32 and with bf16 parameters (FSDP2's compute dtype), and for one
  decoder layer of Qwen3-8B's and Qwen3-14B's shapes (random weights, a small vocabulary);
- the peak of `rl_update` (with and without gradient checkpointing; two identical micro-batches, so the second runs
  with the gradients in place), of the LM head's forward and backward, of `Policy.save` in bf16 and of
  `FeatureModel.hidden_at`, each measured by `new_storage_peak` (a dispatch mode that counts the tensor storages
  ops create until they are freed; CPU kernels and allocator differ from CUDA's: a rough check);
- the KL reference's RoPE: `.to(torch.bfloat16)` casts the rotary `inv_freq` buffers too; the mean |logprob| gap
  between the reference and the policy it copies, by position, with bf16 and with float32 buffers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/memory_plan.py` from anywhere
    sys.path.insert(0, str(REPO))

GB = 1e9
GPUS = {"H200": 141 * GB, "H100": 80 * GB}
"""Nominal memory of one GPU (the CUDA context and allocator fragmentation take a few GB of it)."""


WEIGHT_BUCKET = 512 << 20
"""model.weight_bucket_mb's default, in bytes: the weight stream's bucket on rank 0's host."""


@dataclass(frozen=True)
class ModelShape:
    """A Qwen3 decoder's sizes, as in its Hugging Face config.json."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg: Any, name: str = "") -> ModelShape:
        """From a transformers Qwen3Config (or anything with its attributes). Qwen3 has no q/k/v/MLP biases."""
        assert not getattr(cfg, "attention_bias", False), "attention biases are not in the formula"
        return cls(
            name=name or getattr(cfg, "name_or_path", "") or "model",
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


# From the public config.json of Qwen/Qwen3-8B and Qwen/Qwen3-14B on the Hugging Face hub (not downloaded here): 8.19B
# and 14.77B parameters by `param_shapes`, the 8.2B / 14.8B the model cards state.
QWEN3_8B = ModelShape("Qwen3-8B", 4096, 36, 32, 8, 128, 12288, 151936, False)
QWEN3_14B = ModelShape("Qwen3-14B", 5120, 40, 40, 8, 128, 17408, 151936, False)


# ---------------------------------------------------------------------------------------------- parameters
def layer_shapes(s: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """One decoder layer's parameters by their names in `Qwen3DecoderLayer` (torch's [out, in] layout)."""
    H, Q, K, inter = s.hidden_size, s.q_dim, s.kv_dim, s.intermediate_size
    return [
        ("self_attn.q_proj.weight", (Q, H)),
        ("self_attn.k_proj.weight", (K, H)),
        ("self_attn.v_proj.weight", (K, H)),
        ("self_attn.o_proj.weight", (H, Q)),
        ("self_attn.q_norm.weight", (s.head_dim,)),
        ("self_attn.k_norm.weight", (s.head_dim,)),
        ("mlp.gate_proj.weight", (inter, H)),
        ("mlp.up_proj.weight", (inter, H)),
        ("mlp.down_proj.weight", (H, inter)),
        ("input_layernorm.weight", (H,)),
        ("post_attention_layernorm.weight", (H,)),
    ]


def param_shapes(s: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter tensor of Qwen3ForCausalLM by its name there (a tied LM head is the embedding: listed once)."""
    out = [("model.embed_tokens.weight", (s.vocab_size, s.hidden_size))]
    for i in range(s.num_layers):
        out += [(f"model.layers.{i}.{name}", shape) for name, shape in layer_shapes(s)]
    out.append(("model.norm.weight", (s.hidden_size,)))
    if not s.tie_word_embeddings:
        out.append(("lm_head.weight", (s.vocab_size, s.hidden_size)))
    return out


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def shard_numel(shape: Sequence[int], n: int) -> int:
    """Elements rank 0 holds of a parameter FSDP2 shards on dim 0 over n ranks (ceil(dim0 / n) rows: the largest
    shard; the others are as large or smaller)."""
    return -(-shape[0] // n) * numel(shape[1:])


def n_params(s: ModelShape) -> int:
    return sum(numel(shape) for _, shape in param_shapes(s))


def linear_numel(s: ModelShape) -> int:
    """Elements of the weights autocast casts to bf16: every linear of the layers and the LM head (tied or not)."""
    per_layer = sum(numel(shape) for name, shape in layer_shapes(s) if name.endswith("_proj.weight"))
    return s.num_layers * per_layer + s.vocab_size * s.hidden_size


# ---------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Workload:
    """One micro-batch as `Policy.rl_update` runs it."""

    micro_batch: int
    """B: sequences a forward/backward (under optim.micro_batch_tokens: as many as the budget holds at T tokens)."""
    seq_len: int
    """T: tokens a row, padded (the longest of the micro-batch; at most rollout.max_context_tokens)."""
    kept: int
    """K: positions the LM head sees (the union over rows of the trained next tokens)."""
    checkpointing: bool
    """model.gradient_checkpointing."""
    temperature_scaled: bool = False
    """Sampling temperature != 1: the whole-logits path divides each row's logits, a second float32 copy."""
    feature_batch: int = 16
    """Sequences a `hidden_at` forward (`Policy.hidden_at`'s default batch)."""
    trained: int = 0
    """N: (row, position) pairs whose logprob the chunked head computes (0: B x K, every kept position of every
    row)."""
    chunk: int = 1024
    """model.logprob_chunk: positions whose logits exist at once in the chunked head."""
    head: str = "chunked"
    """"chunked": `LogprobHead` (since issue 21); "full": the whole [B, K, V] logits, as the code did before."""
    feature_tokens: int = 0
    """Padded tokens a `hidden_at` forward (optim.micro_batch_tokens; 0: feature_batch x T)."""

    @property
    def pairs(self) -> int:
        return self.trained or self.micro_batch * self.kept


def layer_saved_per_token(s: ModelShape, r: int) -> int:
    """Bytes autograd saves a token in one decoder layer under autocast; r = 4 with float32 parameters (float32
    residual stream), 2 with bf16 ones (FSDP2's MixedPrecisionPolicy). The module docstring lists the terms."""
    assert r in (2, 4), r
    H, Q, K = s.hidden_size, s.q_dim, s.kv_dim
    norm = 4 * H + r * H + 4
    linear_inputs = 2 * H * (5 if r == 4 else 2)
    qk_norm = 6 * Q + 4 * s.num_heads + 6 * K + 4 * s.num_kv_heads
    sdpa = 4 * Q + 4 * K + 4 * s.num_heads
    mlp = 8 * s.intermediate_size
    return 2 * norm + linear_inputs + qk_norm + sdpa + mlp


HEAD_PAIR_BYTES = 28
"""Bytes the chunked head saves a (row, position) pair besides its hidden state: the float32 log-sum-exp, the int64
target, and the two int64 index vectors of the pairs (gathering them and scattering the result back)."""


def held_activations(s: ModelShape, w: Workload, r: int) -> dict[str, int]:
    """What one micro-batch's graph holds at the end of its forward, by part (bytes)."""
    B, T, K, V, H = w.micro_batch, w.seq_len, w.kept, s.vocab_size, s.hidden_size
    layers = s.num_layers * B * T * (r * H if w.checkpointing else layer_saved_per_token(s, r))
    out = {
        "layers": layers,
        "final_norm": B * T * (4 * H + r * H + 4),
        "rope": 2 * T * s.head_dim * r,
    }
    if w.head == "full":
        out["head_input"] = 2 * B * K * H
        out["logits"] = 4 * B * K * V * (2 if w.temperature_scaled else 1)
    else:  # the hidden state at each computed pair, in the compute dtype, and a few scalars a pair
        out["head_input"] = 2 * w.pairs * H
        out["head_pairs"] = HEAD_PAIR_BYTES * w.pairs
    if r == 4:  # the bf16 weight casts the linears saved (checkpointed layers recast theirs in backward)
        out["weight_casts"] = 2 * (s.vocab_size * H if w.checkpointing else linear_numel(s))
    return out


def head_transients(s: ModelShape, w: Workload) -> dict[str, int]:
    """The chunked head's working memory above what it holds (bytes): in forward one chunk's bf16 logits and their
    float32 upcast (6 bytes a logit); in backward the same chunk recomputed (its float32 softmax gradient, its bf16
    cast and a contiguous copy of that cast's transpose for the weight's product: 10 bytes a logit), the weight's
    gradient summed in float32 (4VH) beside one chunk's bf16 product (2VH; at the end its bf16 result instead), and
    the hidden states' gradient (2NH). Fitted to `--check`'s measurements of the head alone (B = 1..8)."""
    c, V, H = min(w.chunk, max(w.pairs, 1)), s.vocab_size, s.hidden_size
    return {"forward": 6 * c * V, "backward": 6 * V * H + 10 * c * V + 2 * w.pairs * H}


def fsdp2_buffers(s: ModelShape, n: int, w: Workload, fp32_reduce: bool = True) -> dict[str, int]:
    """FSDP2's unsharded buffers live at each activation moment (bytes), from reading torch's FSDP2: the tail unit
    (final norm + LM head; tied embeddings: the embedding too, one tensor) stays gathered in bf16 from the end of the
    forward to the end of its backward (accelerate gives it reshard_after_forward=False); after the head's backward
    its unsharded bf16 gradient is reduce-scattered, through a float32 copy when reducing in float32 (the trainer's
    `fsdp_plugin`, issue 21) with a 1/n output, beside the hidden states' gradient; a recomputed decoder layer has
    its bf16 parameters gathered, the next one prefetched, its bf16 gradient and that gradient's float32 copy for
    the reduce-scatter. Before issue 21 the plan added one allowance (tail parameters and gradient, one layer) to
    every moment."""
    tail = s.hidden_size + s.vocab_size * s.hidden_size
    layer = sum(numel(shape) for _, shape in layer_shapes(s))
    red = 4 if fp32_reduce else 0
    return {
        "forward_end": 2 * tail,
        "head_backward": 2 * tail,
        "tail_reduce": 2 * tail + 2 * tail + red * tail + -(-4 * tail // n) + 2 * w.pairs * s.hidden_size,
        "layer_recompute": 3 * 2 * layer + red * layer + -(-4 * layer // n),
        "reference_forward": 2 * tail,
        "optimizer_step": 0,
    }


def activation_peak(
    s: ModelShape, w: Workload, r: int, n: int, kl_ref: bool, fp32_outputs: bool | None = None, fsdp: bool = False
) -> dict[str, int]:
    """The activation moments of the module docstring (bytes above the states); "peak" is their maximum, and
    "peak_buffers" the FSDP2 buffers (`fsdp2_buffers`, when fsdp) included in it.
    fp32_outputs (whole-logits head only): accelerate's forward wrapper converts the logits to float32 (default:
    r = 4; under FSDP2 accelerate does not wrap the forward)."""
    if fp32_outputs is None:
        fp32_outputs = r == 4
    B, K, V = w.micro_batch, w.kept, s.vocab_size
    held = sum(held_activations(s, w, r).values())
    casts = 2 * (linear_numel(s) - V * s.hidden_size) if r == 4 and w.checkpointing else 0
    if w.head == "full":
        forward_head = 2 * B * K * V  # the bf16 logits while their float32 copy is made
        backward_head = 12 * B * K * V if fp32_outputs else max(12 * K * V, 4 * B * K * V)
        logits_held = 4 * B * K * V
    else:
        ht = head_transients(s, w)
        forward_head, backward_head, logits_held = ht["forward"], ht["backward"], 0
    moments = {
        # autocast's cache of bf16 weight casts lives until its block exits (without checkpointing: in `held`)
        "forward_end": held + casts + forward_head,  # no KV cache: use_cache=False (since d7e0a8d)
        "head_backward": held + backward_head,
        "optimizer_step": 4 * sum(shard_numel(shape, n) for _, shape in param_shapes(s)),
    }
    if w.checkpointing:  # one layer recomputed: its saved tensors and (r = 4) its weights recast, the logits gone
        layer_w = sum(numel(shape) for name, shape in layer_shapes(s) if name.endswith("_proj.weight"))
        moments["layer_recompute"] = (
            held - logits_held + B * w.seq_len * layer_saved_per_token(s, r) + (2 * layer_w if r == 4 else 0)
        )
    if kl_ref:
        moments["reference_forward"] = held + forward_head  # its logits; no KV cache (use_cache=False)
    buffers = {k: 0 for k in moments}
    if fsdp:
        moments["tail_reduce"] = held
        buffers = {k: v for k, v in fsdp2_buffers(s, n, w).items() if k in moments}
        moments = {k: v + buffers[k] for k, v in moments.items()}
    top = max(moments, key=lambda k: moments[k])
    moments["peak"], moments["peak_buffers"] = moments[top], buffers[top]
    return moments


def feature_forward(s: ModelShape, w: Workload, r: int) -> int:
    """`FeatureModel.hidden_at`'s transient for a copy with r-byte parameters (4: float32, 2: bf16), as the code runs
    it since d7e0a8d: the last hidden state only (taken from the final norm by a hook, r bytes) and no KV cache, of a
    forward of `feature_tokens` padded tokens (feature_batch sequences of seq_len without a token budget), plus one
    layer's working set in its MLP (the norm's output and its bf16 cast, then silu(gate), up and their product,
    bf16: (r + 2)H + 6I a token)."""
    tokens, H = w.feature_tokens or w.feature_batch * w.seq_len, s.hidden_size
    return tokens * H * r + tokens * ((r + 2) * H + 6 * s.intermediate_size)


def notes(s: ModelShape, w: Workload) -> dict[str, int]:
    """Single terms of the plan that point at a change in the code (bytes, for workload `w`); the `*_before` ones are
    what the code held before issue 21 at the same micro-batch."""
    B, T, K, V, L = w.micro_batch, w.seq_len, w.kept, s.vocab_size, s.num_layers
    b, H = w.feature_batch, s.hidden_size
    return {
        "logits_held_fp32_before": 4 * B * K * V,
        "head_backward_transient_prepared_before": 12 * B * K * V,
        "head_backward_transient_fsdp2_before": max(12 * K * V, 4 * B * K * V),
        "head_held_chunked": 2 * w.pairs * H + HEAD_PAIR_BYTES * w.pairs,
        "head_backward_transient_chunked": head_transients(s, w)["backward"],
        "unsharded_bf16_grads_no_sync_before": 2 * n_params(s),
        "training_kv_cache_keys_fp32": L * B * T * s.kv_dim * 4,
        "autocast_weight_casts": 2 * linear_numel(s),
        "feature_forward_fp32_copy": feature_forward(s, w, 4),
        "feature_forward_bf16_copy": feature_forward(s, w, 2),
        # with only the last hidden state kept and no KV cache: that state and one layer's working set
        "feature_forward_lean_bf16_copy": b * T * H * 2 + b * T * (4 * H + 6 * s.intermediate_size),
    }


def gather_allowance(s: ModelShape, n: int, fp32_reduce: bool = True) -> int:
    """FSDP2's unsharded buffers at the head (bytes): the tail unit (final norm + LM head; with tied embeddings the
    embedding too, one tensor) in bf16 and its unsharded bf16 gradient, one prefetched decoder layer; and, reducing
    in float32 (the trainer's `fsdp_plugin`, issue 21), the float32 copy of the tail's gradient FSDP2 reduce-scatters
    and its 1/n output."""
    tail = s.hidden_size + s.vocab_size * s.hidden_size
    layer = sum(numel(shape) for _, shape in layer_shapes(s))
    out = 2 * (2 * tail + layer)
    if fp32_reduce:
        out += 4 * tail + -(-4 * tail // n)
    return out


# ---------------------------------------------------------------------------------------------- the plan
def states(s: ModelShape, n: int) -> dict[str, int]:
    """Per-rank bytes of the training state with parameters, gradients and AdamW sharded over n ranks (n = 1: none),
    plus the host-side AdamW step counters and the optional copies (replicated and sharded)."""
    shapes = param_shapes(s)
    N = sum(numel(shape) for _, shape in shapes)
    local = sum(shard_numel(shape, n) for _, shape in shapes)
    return {
        "params": 4 * local,
        "grads": 4 * local,
        "adam": 8 * local,
        "adam_step_host": 4 * len(shapes),
        "reference_replicated": 2 * N,
        "reference_sharded": 2 * local,
        "features_replicated": 4 * N,
        "features_sharded": 4 * local,
        "features_bf16": 2 * N,
        # the weight stream's bucket on rank 0's host (or the largest tensor alone), and before issue 23: the bf16
        # weights, the float32 state dict gathered to cast them, and (FSDP) the bf16 copy kept for the feature model
        "engine_weights_host": min(2 * N, max(WEIGHT_BUCKET, 2 * max(numel(shape) for _, shape in shapes))),
        "engine_weights_host_before_issue_23": 2 * N + 4 * N + (2 * N if n > 1 else 0),
        # start-up: rank 0 loads the checkpoint in float32 (the master dtype); followers under FSDP build on the meta
        # device (issue 21; before, every rank loaded it: 4N each)
        "startup_host_rank0": 4 * N,
        "startup_host_follower": 0 if n > 1 else 4 * N,
    }


def plan(s: ModelShape, w: Workload, strategy: str, n: int, kl_ref: bool = False) -> dict[str, Any]:
    """Per-rank bytes under `strategy` ("fsdp2" over n GPUs or "ddp"), by component. `total`: rank 0's peak in
    training, with the feature copy as the code makes it (run.max_staleness >= 1) and the KL reference when kl_ref
    (replicated, as the code makes it; the code refuses it under FSDP for now); `worst`: plus a feature forward at the
    same moment."""
    assert strategy in ("fsdp2", "ddp"), strategy
    shard = n if strategy == "fsdp2" else 1
    r = 2 if strategy == "fsdp2" else 4
    st = states(s, shard)
    act = activation_peak(s, w, r, shard, kl_ref, fsdp=strategy == "fsdp2")
    row: dict[str, Any] = {
        "model": s.name,
        "strategy": strategy,
        "gpus": n,
        "n_params": n_params(s),
        **{k: st[k] for k in ("params", "grads", "adam")},
        "ddp_buckets": 4 * n_params(s) if strategy == "ddp" else 0,
        "gather": act["peak_buffers"],  # FSDP2's unsharded buffers at the peak moment (0 under DDP)
        # FSDP2 reduce-scatters every micro-batch (issue 21): no unsharded gradient is held between micro-batches.
        # Before, `no_sync` kept the whole model's bf16 gradient on every rank until the step's last one.
        "unsharded_grads": 0,
        "activations": act,
        "held_activations": held_activations(s, w, r),
        "activation_peak": act["peak"] - act["peak_buffers"],
        "reference": st["reference_replicated"] if kl_ref else 0,
        "features": st["features_bf16"] if strategy == "fsdp2" else st["features_replicated"],
        **{k: st[k] for k in st if k not in ("params", "grads", "adam")},
        "feature_forward": feature_forward(s, w, r),
    }
    parts = ("params", "grads", "adam", "ddp_buckets", "gather", "unsharded_grads", "activation_peak", "reference")
    parts += ("features",)
    row["total"] = sum(row[k] for k in parts)
    row["worst"] = row["total"] + row["feature_forward"]
    row["fits"] = {gpu: row["total"] <= cap for gpu, cap in GPUS.items()}
    row["fits_worst"] = {gpu: row["worst"] <= cap for gpu, cap in GPUS.items()}
    return row


def workload_from_config(
    path: Path, micro_batch: int | None = None, checkpointing: bool | None = None, tokens: int | None = None
) -> Workload:
    """The worst micro-batch a config allows. T = rollout.max_context_tokens. Under a token budget
    (optim.micro_batch_tokens, or `tokens`) B = the budget // T full-length rows (the padded tokens the layers see
    are at most the budget whatever the rows) and the head's pairs N = min(budget, micro_batch_size x max_turns x
    max_new_tokens), the most trained tokens any packing of the budget holds; without one B = optim.micro_batch_size
    (or `micro_batch`). K = min(T - 1, B x max_turns x max_new_tokens) (every row's trained tokens at different
    positions)."""
    from trainer.config import load_train_config

    cfg = load_train_config(path)
    budget = cfg.optim.micro_batch_tokens if tokens is None else tokens
    T = cfg.rollout.max_context_tokens
    trained = cfg.env.max_turns * cfg.rollout.max_new_tokens
    if micro_batch is None and budget:
        B = max(1, min(cfg.optim.micro_batch_size, budget // T))
        pairs = min(budget, cfg.optim.micro_batch_size * trained)
    else:
        B = micro_batch or cfg.optim.micro_batch_size
        pairs = 0
    return Workload(
        micro_batch=B,
        seq_len=T,
        kept=min(T - 1, B * trained),
        checkpointing=cfg.model.gradient_checkpointing if checkpointing is None else checkpointing,
        temperature_scaled=cfg.rollout.temperature not in (0.0, 1.0),
        trained=pairs,
        chunk=cfg.model.logprob_chunk,
        feature_tokens=min(16 * T, budget) if budget else 0,
    )


def before_issue_21(s: ModelShape, w: Workload, n: int) -> dict[str, Any]:
    """Rank 0 under FSDP2 x n as the code was before issue 21, at micro-batches of 4 sequences (the shipped
    config's count then): whole-logits head, `no_sync` holding the unsharded bf16 gradient, bf16 reduction, hidden_at
    forwards of 16 full-length sequences."""
    old = replace(w, micro_batch=4, kept=min(w.seq_len - 1, 4 * (w.kept // max(w.micro_batch, 1))), trained=0)
    old = replace(old, head="full", feature_tokens=0)
    row = plan(s, old, "fsdp2", n)
    act = activation_peak(s, old, 2, n, kl_ref=False)  # the old plan: one allowance on top of the peak moment
    row["activation_peak"] = act["peak"]
    row["gather"] = gather_allowance(s, n, fp32_reduce=False)
    row["unsharded_grads"] = 2 * n_params(s)
    parts = ("params", "grads", "adam", "gather", "unsharded_grads", "activation_peak", "features")
    row["total"] = sum(row[k] for k in parts)
    row["worst"] = row["total"] + row["feature_forward"]
    row["fits"] = {gpu: row["total"] <= cap for gpu, cap in GPUS.items()}
    row["fits_worst"] = {gpu: row["worst"] <= cap for gpu, cap in GPUS.items()}
    return row


def gb(x: float) -> str:
    return f"{x / GB:.1f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [f"{r['model']} " + (f"fsdp2x{r['gpus']}" if r["strategy"] == "fsdp2" else "ddp") for r in rows]
    lines = [
        ("params (fp32)", "params"),
        ("grads (fp32)", "grads"),
        ("AdamW m+v (fp32)", "adam"),
        ("DDP grad buckets (fp32)", "ddp_buckets"),
        ("FSDP2 buffers at the peak", "gather"),
        ("unsharded grads (no_sync)", "unsharded_grads"),
        ("activation peak", "activation_peak"),
        ("feature copy, rank 0", "features"),
        ("= total, rank 0", "total"),
        ("+ feature forward (b=16)", "feature_forward"),
        ("= worst, rank 0", "worst"),
        ("KL ref bf16, replicated", "reference_replicated"),
        ("KL ref bf16, if sharded", "reference_sharded"),
        ("features fp32, if sharded", "features_sharded"),
        ("host, rank 0: weight hand-off", "engine_weights_host"),
        ("  the same, before issue 23", "engine_weights_host_before_issue_23"),
        ("host at start-up, rank 0", "startup_host_rank0"),
        ("host at start-up, a follower", "startup_host_follower"),
    ]
    width = max(len(c) for c in cols) + 2
    print(f"{'GB per rank':30s}" + "".join(f"{c:>{width}s}" for c in cols))
    for label, key in lines:
        print(f"{label:30s}" + "".join(f"{gb(r[key]):>{width}s}" for r in rows))
    for key, label in (("fits", "total"), ("fits_worst", "worst")):
        for gpu in GPUS:
            cells = "".join(f"{'yes' if r[key][gpu] else 'no':>{width}s}" for r in rows)
            print(f"{label + ' fits ' + gpu:30s}" + cells)


# ---------------------------------------------------------------------------------------------- the checks
def tensor_bytes(tensors: Iterator[Any]) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def tiny_samples(
    n: int = 8, length: int | None = None, seed: int = 0, vocab: int = 2000, trained_frac: float = 0.4
) -> list[Any]:
    """n TrainSamples whose last `trained_frac` of tokens are trained (the loss mask; 40% by default), token ids in
    11..vocab (the tiny vocabulary by default): of 40, 60, 80, ... tokens, or all of `length` tokens (identical
    micro-batches)."""
    import random

    from trainer.learner.samples import TrainSample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        size = length or 40 + 20 * i
        trained = size * 2 // 5 if trained_frac == 0.4 else int(size * trained_frac)
        mask = [0] * (size - trained) + [1] * trained
        out.append(
            TrainSample(
                input_ids=[rng.randrange(11, vocab) for _ in range(size)],
                loss_mask=mask,
                advantages=[(1.0 if i % 2 else -1.0) * m for m in mask],
                weights=[float(m) for m in mask],
                engine_logprobs=[-7.6] * size,
                prompt_id=f"p{i}",
                tree_index=0,
                leaf_id=i,
            )
        )
    return out


def measure_states(model_dir: Path, mixed_precision: str = "bf16") -> dict[str, int]:
    """Construct `Policy` on the CPU (KL reference on), run one `rl_update`, make a `FeatureModel`, and count what
    they hold (bytes)."""
    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.policy import FeatureModel, Policy

    pol = Policy(
        model_dir, ModelConfig(device="cpu", mixed_precision=mixed_precision), OptimConfig(kl_coef=0.1, lr=1e-4)
    )
    pol.rl_update(tiny_samples())
    model = pol.accelerator.unwrap_model(pol.model)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), "every parameter gets a gradient from one update"
    opt_state = [v for st in pol.optimizer.state.values() for v in st.values()]
    assert pol.ref_model is not None
    return {
        "params": tensor_bytes(model.parameters()),
        "grads": tensor_bytes(iter(grads)),
        "adam": tensor_bytes(v for st in pol.optimizer.state.values() for k, v in st.items() if k != "step"),
        "adam_step_host": tensor_bytes(v for st in pol.optimizer.state.values() for k, v in st.items() if k == "step"),
        "optimizer_tensors": len(opt_state),
        "reference": tensor_bytes(pol.ref_model.parameters()),
        "features": tensor_bytes(FeatureModel(pol).model.parameters()),
    }


def planned_states(s: ModelShape, reference_bytes_per_param: int) -> dict[str, int]:
    """The plan's figures for one process (n = 1) in `measure_states`' keys."""
    st = states(s, 1)
    N = n_params(s)
    return {
        "params": st["params"],
        "grads": st["grads"],
        "adam": st["adam"],
        "adam_step_host": st["adam_step_host"],
        "optimizer_tensors": 3 * len(param_shapes(s)),
        "reference": reference_bytes_per_param * N,
        "features": st["features_replicated"],
    }


def saved_bytes(fn: Callable[[], Any], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs, storages in `exclude` left out."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def check_saved(model: Any, s: ModelShape, B: int, T: int, kept_from: int, r: int, seed: int = 0) -> dict[str, int]:
    """Autograd's saved bytes for `sequence_logprobs` under bf16 autocast on `model` (B rows of T random tokens, the
    positions from `kept_from` on trained) against `held_activations` (parameters excluded, the bf16 casts kept)."""
    import torch

    from trainer.learner.loss import install_logprob_head, sequence_logprobs

    install_logprob_head(model)  # as the policy runs it (issue 21)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(11, s.vocab_size, (B, T), generator=g)
    att = torch.ones_like(ids)
    needed = torch.zeros(B, T)
    needed[:, kept_from:] = 1

    def run() -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sequence_logprobs(model, ids, att, needed=needed).float()

    measured = saved_bytes(run, {p.untyped_storage().data_ptr() for p in model.parameters()})
    w = Workload(micro_batch=B, seq_len=T, kept=T - kept_from, checkpointing=False)
    held = held_activations(s, w, r)
    if r == 2:  # parameters already bf16: nothing cast, nothing counted
        held.pop("weight_casts", None)
    return {"measured": measured, "planned": sum(held.values()), **{f"planned_{k}": v for k, v in held.items()}}


def layer_check(s: ModelShape, T: int = 32) -> dict[str, int]:
    """`layer_saved_per_token` against autograd's saved bytes for ONE decoder layer of shape `s` (random weights,
    vocabulary 512, one row of T tokens, all trained): the measured bytes less the non-layer terms of the plan."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    small = replace(s, num_layers=1, vocab_size=512)
    cfg = Qwen3Config(
        vocab_size=small.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        head_dim=s.head_dim,
        tie_word_embeddings=s.tie_word_embeddings,
        use_cache=True,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).train()
    got = check_saved(model, small, B=1, T=T, kept_from=1, r=4)
    outside = got["planned"] - got["planned_layers"]
    del model
    return {
        "tokens": T,
        "measured_per_token": (got["measured"] - outside) // T,
        "planned_per_token": layer_saved_per_token(s, 4),
    }


def new_storage_peak(fn: Callable[[], Any], existing: Iterator[Any]) -> int:
    """Peak bytes of the tensor storages `fn` creates and still holds: a dispatch mode counts each new storage an op
    returns until it is freed; storages of `existing` (parameters, buffers, gradients) are not new. (torch's
    MemTracker does the like with categories, but refuses frozen modules and a module run twice in its context.)"""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    before = {t.untyped_storage().data_ptr() for t in existing}
    state = {"current": 0, "peak": 0}
    seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def free(n: int) -> None:
        state["current"] -= n

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st.data_ptr() in before or st in seen:
                        continue
                    seen[st] = n = st.nbytes()
                    weakref.finalize(st, free, n)
                    state["current"] += n
                    state["peak"] = max(state["peak"], state["current"])
            return out

    with Count():
        fn()
    return state["peak"]


def check_peaks(model_dir: Path, s: ModelShape) -> dict[str, Any]:
    """Measured transient peaks (`new_storage_peak`) against the plan's, on the tiny model (rough: CPU kernels)."""
    import torch
    from accelerate import Accelerator
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.loss import install_logprob_head, sequence_logprobs
    from trainer.learner.policy import FeatureModel, Policy

    out: dict[str, Any] = {}
    T = 100
    samples = tiny_samples(8, length=T)  # two identical micro-batches of 4 rows, 40 trained tokens at 60..99
    w = Workload(micro_batch=4, seq_len=T, kept=40, checkpointing=False)
    for ckpt in (False, True):
        pol = Policy(
            model_dir,
            ModelConfig(device="cpu", mixed_precision="bf16", gradient_checkpointing=ckpt),
            OptimConfig(micro_batch_size=4, lr=1e-4),
        )
        pol.rl_update(samples)
        model = pol.accelerator.unwrap_model(pol.model)
        existing = [*model.parameters(), *model.buffers()]
        existing += [v for st in pol.optimizer.state.values() for v in st.values()]
        # zero_grad frees the last step's gradients (never counted) and the first micro-batch makes new ones (4N,
        # counted, kept): the second micro-batch's peak less those is the activation peak with the states in place.
        measured = new_storage_peak(lambda pol=pol: pol.rl_update(samples), iter(existing)) - 4 * n_params(s)
        act = activation_peak(s, replace(w, checkpointing=ckpt), 4, 1, kl_ref=False)
        # CPU AdamW (not foreach) makes temporaries the size of one parameter at a time, not of all of them.
        act["optimizer_step"] = 2 * 4 * max(numel(shape) for _, shape in param_shapes(s))
        act["peak"] = max(v for k, v in act.items() if k != "peak")
        out[f"rl_update_ckpt_{ckpt}"] = {"measured": measured, "planned": act["peak"], "planned_moments": act}
    # Policy.save in bf16 (the engines' dtype of a Qwen3 checkpoint).
    pol = Policy(model_dir, ModelConfig(device="cpu", mixed_precision="bf16", save_dtype="bfloat16"), OptimConfig())
    model = pol.accelerator.unwrap_model(pol.model)
    with tempfile.TemporaryDirectory() as d:
        saved = new_storage_peak(lambda: pol.save(Path(d)), iter([*model.parameters(), *model.buffers()]))
    out["save_bf16"] = {"measured": saved, "bf16_copy": 2 * n_params(s), "fp32_copy": 4 * n_params(s)}
    # FeatureModel.hidden_at on 16 sequences of T tokens (one forward).
    feats = FeatureModel(pol)
    seqs = [[(7 * i + j) % 1989 + 11 for j in range(T)] for i in range(16)]
    got = new_storage_peak(
        lambda: feats.hidden_at(seqs, [[T - 1]] * 16), iter([*feats.model.parameters(), *feats.model.buffers()])
    )
    out["feature_forward"] = {"measured": got, "planned": feature_forward(s, replace(w, feature_batch=16), 4)}
    # The LM head where it dominates: one small layer, a 32k vocabulary, every position trained; the model prepared
    # by accelerate as Policy's is on one GPU or under DDP (bf16 autocast, outputs converted to float32), and not
    # prepared, as under FSDP2 (accelerate does not wrap an FSDP2 model's forward: bf16 logits).
    T2, V = 128, 32768
    head = replace(s, num_layers=1, hidden_size=64, num_heads=1, num_kv_heads=1, head_dim=64, intermediate_size=64)
    head = replace(head, vocab_size=V, tie_word_embeddings=False)
    cfg = Qwen3Config(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=False,
    )
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    out["head"] = []
    for head_kind, prepared in (("full", True), ("full", False), ("chunked", True), ("chunked", False)):
        torch.manual_seed(0)
        m = Qwen3ForCausalLM(cfg).train()
        if head_kind == "chunked":
            install_logprob_head(m)
        if prepared:
            m = acc.prepare_model(m)
        for B in (1, 2, 4, 8):
            ids = torch.randint(11, V, (B, T2), generator=torch.Generator().manual_seed(B))

            def forward(m: Any = m, ids: Any = ids) -> Any:
                with acc.autocast():
                    return sequence_logprobs(m, ids, torch.ones_like(ids), needed=torch.ones(ids.shape), chunk=32)

            def forward_backward(forward: Callable[[], Any] = forward) -> None:
                forward().sum().backward()

            forward_backward()  # gradients allocated, as from the second micro-batch on
            existing = [*m.parameters(), *m.buffers(), *(p.grad for p in m.parameters())]
            w = Workload(micro_batch=B, seq_len=T2, kept=T2 - 1, checkpointing=False, chunk=32, head=head_kind)
            act = activation_peak(head, w, 4, 1, False, fp32_outputs=prepared)
            out["head"].append(
                {
                    "head": head_kind,
                    "prepared": prepared,
                    "micro_batch": B,
                    "forward_measured": new_storage_peak(forward, iter(existing)),
                    "forward_planned": act["forward_end"],
                    "backward_measured": new_storage_peak(forward_backward, iter(existing)),
                    "backward_planned": act["head_backward"],
                    "logits_fp32": 4 * B * (T2 - 1) * V,
                }
            )
    return out


def ref_rope_drift(model_dir: Path, T: int = 4000) -> dict[str, Any]:
    """Mean |logprob gap| between the bf16 KL reference and the policy it copies (same weights), by position, with
    the reference's rotary buffers as `Policy` leaves them (bf16) and restored to float32."""
    import torch

    from trainer.learner.config import ModelConfig, OptimConfig
    from trainer.learner.loss import sequence_logprobs
    from trainer.learner.policy import Policy

    pol = Policy(model_dir, ModelConfig(device="cpu", mixed_precision="bf16"), OptimConfig(kl_coef=0.1))
    assert pol.ref_model is not None
    rot_ref = pol.ref_model.model.rotary_emb
    rot_pol = pol.accelerator.unwrap_model(pol.model).model.rotary_emb
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(11, 2000, (1, T), generator=g)
    att = torch.ones_like(ids)
    with torch.no_grad(), pol.accelerator.autocast():
        policy = sequence_logprobs(pol.model, ids, att).float()
        bf16 = sequence_logprobs(pol.ref_model, ids, att).float()
        buffer_dtype = str(rot_ref.inv_freq.dtype)
        rot_ref.inv_freq = rot_pol.inv_freq.clone()
        fp32 = sequence_logprobs(pol.ref_model, ids, att).float()
    spans = [(1, 100), (100, 1000), (1000, 2000), (2000, T)]
    return {
        "ref_inv_freq_dtype": buffer_dtype,
        "spans": spans,
        "gap_bf16_buffers": [float((policy - bf16)[0, a:b].abs().mean()) for a, b in spans],
        "gap_fp32_buffers": [float((policy - fp32)[0, a:b].abs().mean()) for a, b in spans],
    }


def run_checks(model_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    s = ModelShape.from_hf(AutoConfig.from_pretrained(str(model_dir)), name="tiny")
    out: dict[str, Any] = {"shape": asdict(s), "n_params": n_params(s)}
    out["states"] = {"measured": measure_states(model_dir), "planned": planned_states(s, 2)}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).train()
    out["saved_fp32_params"] = check_saved(model, s, B=4, T=128, kept_from=80, r=4)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # FSDP2's compute dtype (buffers too; they are not saved)
    out["saved_bf16_params"] = check_saved(bf16, s, B=4, T=128, kept_from=80, r=2)
    del model, bf16
    out["layer_qwen3_8b"] = layer_check(QWEN3_8B)
    out["layer_qwen3_14b"] = layer_check(QWEN3_14B)
    out["peaks"] = check_peaks(model_dir, s)
    out["ref_rope"] = ref_rope_drift(model_dir)
    # accelerate's state is one per process and everything above ran under bf16: this one runs in a child process.
    out["states_no_mixed_precision"] = {
        "measured": states_in_subprocess(model_dir, "no"),
        "planned": planned_states(s, 4),
    }
    return out


def states_in_subprocess(model_dir: Path, mixed_precision: str) -> dict[str, int]:
    """`measure_states` in a fresh Python process (`--states MP`), for a mixed precision this process cannot take."""
    import subprocess

    cmd = [sys.executable, __file__, "--states", mixed_precision, "--tiny-dir", str(model_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{cmd} failed: {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_checks(c: dict[str, Any]) -> None:
    print(f"\ntiny model: {c['n_params']:,} parameters")
    for key in ("states", "states_no_mixed_precision"):
        m, p = c[key]["measured"], c[key]["planned"]
        print(f"{key:28s} " + "  ".join(f"{k} {m[k]:,}/{p[k]:,}" for k in m) + "  (measured/planned bytes)")
    for key in ("saved_fp32_params", "saved_bf16_params"):
        m, p = c[key]["measured"], c[key]["planned"]
        print(f"{key:28s} measured {m:,}  planned {p:,}  ({m / p - 1:+.2%})")
    for key in ("layer_qwen3_8b", "layer_qwen3_14b"):
        m, p = c[key]["measured_per_token"], c[key]["planned_per_token"]
        print(f"{key:28s} per token measured {m:,}  planned {p:,}")
    for key, v in c["peaks"].items():
        for row in v if isinstance(v, list) else [v]:
            figures = "  ".join(f"{k} {x:,}" for k, x in row.items() if isinstance(x, int) and not isinstance(x, bool))
            label = f"{key} {row['head']} prepared={row['prepared']}" if "prepared" in row else key
            print(f"peak {label:23s} {figures}")
    rr = c["ref_rope"]
    print(f"KL reference inv_freq {rr['ref_inv_freq_dtype']}; |logprob gap| by position span {rr['spans']}:")
    print("  bf16 buffers " + "  ".join(f"{x:.4f}" for x in rr["gap_bf16_buffers"]))
    print("  fp32 buffers " + "  ".join(f"{x:.4f}" for x in rr["gap_fp32_buffers"]))


KNOB_COLUMNS = {
    "act_peak": "activation peak (FSDP2)",
    "fsdp2x4": "FSDP2 x4, rank 0",
    "fsdp2x6": "FSDP2 x6 (configs/accelerate/fsdp2.yaml), rank 0",
    "fsdp2x8": "FSDP2 x8, rank 0",
    "fsdp2x8_no_features": "FSDP2 x8, no feature copy (other ranks, or max_staleness 0)",
    "fsdp2x8_kl_ref": "FSDP2 x8, rank 0 + KL reference replicated",
    "fsdp2x6_worst": "FSDP2 x6, rank 0 + a feature forward",
    "fsdp2x8_worst": "FSDP2 x8, rank 0 + a feature forward",
    "ddp": "DDP, rank 0",
}
BUDGETS = (32768, 16384, 8192)
"""optim.micro_batch_tokens values the knob table shows."""


def knob_rows(config: Path) -> list[dict[str, Any]]:
    """What to switch on: per-rank totals by token budget a micro-batch and gradient checkpointing, for both models."""
    out = []
    for shape in (QWEN3_8B, QWEN3_14B):
        for ckpt in (True, False):
            for budget in BUDGETS:
                w = workload_from_config(config, checkpointing=ckpt, tokens=budget)
                f4, f6, f8 = (plan(shape, w, "fsdp2", n) for n in (4, 6, 8))
                out.append(
                    {
                        "model": shape.name,
                        "checkpointing": ckpt,
                        "tokens": budget,
                        "micro_batch": w.micro_batch,
                        "pairs": w.pairs,
                        "act_peak": f8["activation_peak"],
                        "fsdp2x4": f4["total"],
                        "fsdp2x6": f6["total"],
                        "fsdp2x8": f8["total"],
                        "fsdp2x8_no_features": f8["total"] - f8["features"],
                        "fsdp2x8_kl_ref": plan(shape, w, "fsdp2", 8, kl_ref=True)["total"],
                        "fsdp2x6_worst": f6["worst"],
                        "fsdp2x8_worst": f8["worst"],
                        "ddp": plan(shape, w, "ddp", 8)["total"],
                    }
                )
    return out


def print_knobs(knobs: list[dict[str, Any]]) -> None:
    print("\nGB per rank; columns: " + "; ".join(f"{k} = {v}" for k, v in KNOB_COLUMNS.items()))
    print(f"{'model':10s} {'ckpt':>5s} {'tokens':>6s} {'B':>2s}" + "".join(f"{k:>20s}" for k in KNOB_COLUMNS))
    for k in knobs:
        head = f"{k['model']:10s} {k['checkpointing']!s:>5s} {k['tokens']:6d} {k['micro_batch']:2d}"
        print(head + "".join(f"{gb(k[c]):>20s}" for c in KNOB_COLUMNS))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "qwen3-8b-hotpotqa.toml")
    ap.add_argument("--out", type=Path, default=None, help="write the plan (and checks) as JSON here")
    ap.add_argument("--check", action="store_true", help="also run the checks on the tiny model (CPU)")
    ap.add_argument("--tiny-dir", type=Path, default=None, help="a built tiny model (default: build one in a temp dir)")
    ap.add_argument("--states", choices=("no", "bf16"), help="only print measure_states' JSON for this mixed precision")
    args = ap.parse_args(argv)
    if args.states:
        assert args.tiny_dir is not None, "--states needs --tiny-dir"
        print(json.dumps(measure_states(args.tiny_dir, mixed_precision=args.states)))
        return 0

    base = workload_from_config(args.config)
    rows = [
        plan(shape, base, strategy, n)
        for shape in (QWEN3_8B, QWEN3_14B)
        for strategy, n in (("fsdp2", 4), ("fsdp2", 6), ("fsdp2", 8), ("ddp", 8))
    ]
    print(f"workload ({args.config.name}): {asdict(base)}")
    print_table(rows)
    before = {
        f"{shape.name} fsdp2x{n}": before_issue_21(shape, base, n) for shape, n in ((QWEN3_8B, 6), (QWEN3_14B, 8))
    }
    print("\nrank 0, GB: before issue 21 (4 sequences a micro-batch, whole logits, no_sync) -> now (worst = + a "
          "feature forward)")  # fmt: skip
    for (name, old), new in zip(before.items(), (rows[1], rows[6]), strict=True):
        print(
            f"  {name}: total {gb(old['total'])} -> {gb(new['total'])}, worst {gb(old['worst'])} -> {gb(new['worst'])}"
            f"; fits an H100 in the worst case: {old['fits_worst']['H100']} -> {new['fits_worst']['H100']}"
        )
    # What to switch on: the activation peak of one micro-batch, by micro-batch size and checkpointing.
    knobs = knob_rows(args.config)
    print_knobs(knobs)
    found = {shape.name: notes(shape, base) for shape in (QWEN3_8B, QWEN3_14B)}
    print("\nGB, the config's micro-batch: " + ", ".join(found[QWEN3_8B.name]))
    for name, v in found.items():
        print(f"{name:10s} " + "  ".join(gb(x) for x in v.values()))
    for shape in (QWEN3_8B, QWEN3_14B):
        per_token = {r: layer_saved_per_token(shape, r) for r in (4, 2)}
        found[shape.name] |= {
            "layer_saved_per_token_fp32_params": per_token[4],
            "layer_saved_per_token_bf16": per_token[2],
        }
        print(
            f"{shape.name}: a layer saves {per_token[4]:,} bytes a token (float32 parameters), {per_token[2]:,} (bf16)"
        )
    result: dict[str, Any] = {"workload": asdict(base), "gpus_bytes": GPUS, "plan": rows, "knobs": knobs}
    result["before_issue_21"] = before
    result["notes"] = found
    if args.check:
        if args.tiny_dir is not None:
            result["checks"] = run_checks(args.tiny_dir)
        else:
            from tools.tiny_model import build_tiny_model

            with tempfile.TemporaryDirectory() as d:
                result["checks"] = run_checks(build_tiny_model(Path(d) / "tiny", seed=0))
        print_checks(result["checks"])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The CPU development engine's facade: its config, request and error types, and `Engine`, which loads the model.

It serves the subset of SGLang's `/generate` that `shared/engine_protocol.py` describes, with SGLang's semantics,
so the trainer's engine client runs unchanged against it and against real SGLang (DESIGN §3). It is synchronous
and single-threaded by contract: one worker thread (owned by `app.EngineService`) calls every method; nothing here
takes a lock. `Engine.generate` runs requests to completion for in-process callers (bench, tests).

`Engine` owns what is fixed per model: loading it (and its tokenizer, EOS ids), request validation (what SGLang
would refuse answers `BadRequest`), weight updates, cache flushes and `server_info`. The work is in the modules it
is built from, each stating its own contract:
- `scheduler.Scheduler` (Engine's base class): continuous batching, prefill/decode, finish checks, responses;
- `radix_cache.RadixKVCache`: the token-level radix prefix cache and what `meta_info.cached_tokens` means;
- `kv_buffer.KVLayer`: the preallocated, doubling KV buffers transformers writes into;
- `sampling.sample_tokens`: SGLang's temperature/top-k/top-p/min-p order and which distribution logprobs come from.
The app, CLI and benches import from here (`engine.engine`); `RadixKVCache` and `sample_tokens` are re-exported.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.radix_cache import RadixKVCache
from engine.sampling import sample_tokens
from engine.scheduler import Scheduler
from shared.engine_protocol import SamplingParams

__all__ = [
    "DTYPES",
    "ENGINE_NAME",
    "BadRequest",
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "RadixKVCache",
    "sample_tokens",
]

ENGINE_NAME = "trace-cpu-engine"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BadRequest(ValueError):
    """A request the engine refuses (answered 400 with this message)."""


@dataclass
class EngineConfig:
    """How the engine is built. Every field is a CLI flag of `trace-engine serve`."""

    model_path: Path
    """A save_pretrained folder (config.json, safetensors, optionally a tokenizer)."""
    device: str = "cpu"
    """torch device: "cpu" or "cuda[:i]"."""
    dtype: str = "float32"
    """float32 on CPU; bfloat16 on CUDA."""
    max_batch: int = 32
    """Most sequences decoding at once; more wait. 32 covers a tree's branches at the trainer's concurrency."""
    cache_tokens: int = 131_072
    """Prefix-cache capacity in tokens. The tiny model's KV is 4 KiB/token in fp32, so 512 MiB."""
    enable_prefix_cache: bool = True
    """False (`--no-cache`): every prompt is prefilled from scratch (for benchmarks)."""
    seed: int = 0
    """Seed of the engine's sampling generator."""
    return_original_logprob: bool = False
    """Mirror of SGLANG_RETURN_ORIGINAL_LOGPROB: logprobs of the untempered distribution."""
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: use one of {sorted(DTYPES)}")
        if self.max_batch < 1 or self.cache_tokens < 0 or self.threads < 0:
            raise ValueError(f"max_batch={self.max_batch} >= 1, cache_tokens={self.cache_tokens} >= 0, threads >= 0")


@dataclass(eq=False)
class EngineRequest:
    """One prompt to complete. `aborted` may be set from another thread; the engine checks it every step."""

    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0  # top logprobs per output token (SGLang answers them only with return_logprob)
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    t_submit: float = field(default_factory=time.perf_counter)
    aborted: bool = False
    abort_message: str = "aborted by request"
    future: Any = None  # set by the async layer; the engine never touches it


class Engine(Scheduler):
    """Owns the model, tokenizer, prefix cache and (through `Scheduler`) the running batch. Single-threaded: see the
    module docstring."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        path = Path(cfg.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        conf = self.model.config
        types = set(getattr(conf, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            raise ValueError(f"{path}: layer types {sorted(types)} unsupported; the engine needs full attention only")
        self.vocab_size: int = conf.vocab_size
        self.context_len: int = conf.max_position_embeddings
        self.tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
        self.eos_ids = frozenset(self._eos_ids())
        self.model_path = str(path)
        self.weight_version = "default"
        self.cache = RadixKVCache(cfg.cache_tokens if cfg.enable_prefix_cache else 0)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        super().__init__()  # the scheduler's queue, running batch and counters

    def _eos_ids(self) -> set[int]:
        """SGLang's EOS set: config.json's and generation_config.json's eos_token_id, plus the tokenizer's."""
        ids: set[int] = set()
        for src in (self.model.config.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if src is not None:
                ids.update([src] if isinstance(src, int) else src)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ----------------------------------------------------------------------------------------- validation

    def validate(self, req: EngineRequest) -> None:
        """Raise BadRequest (with the offending values) for anything SGLang would refuse or this engine lacks."""
        ids, p = req.input_ids, req.params
        if not ids:
            raise BadRequest("input_ids is empty: send at least one token id")
        bad = next((t for t in ids if type(t) is not int or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"input_ids contains {bad!r}: token ids must be ints in [0, {self.vocab_size})")
        if len(ids) >= self.context_len:
            raise BadRequest(
                f"The input ({len(ids)} tokens) is longer than the model's context length ({self.context_len} tokens)."
            )
        if p.max_new_tokens is None or p.max_new_tokens < 0:
            raise BadRequest(f"max_new_tokens must be at least 0, got {p.max_new_tokens}.")
        if len(ids) + p.max_new_tokens > self.context_len:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of {self.context_len} tokens: "
                f"{len(ids)} input tokens + max_new_tokens {p.max_new_tokens}."
            )
        if not (math.isfinite(p.temperature) and p.temperature >= 0.0):
            raise BadRequest(f"temperature must be a non-negative finite number, got {p.temperature}.")
        if not 0.0 < p.top_p <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {p.top_p}.")
        if not 0.0 <= p.min_p <= 1.0:
            raise BadRequest(f"min_p must be in [0, 1], got {p.min_p}.")
        if p.top_k != -1 and p.top_k < 1:
            raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {p.top_k}.")
        if not 0 <= req.top_logprobs_num <= self.vocab_size:
            raise BadRequest(f"top_logprobs_num must be in [0, {self.vocab_size}], got {req.top_logprobs_num}.")
        if p.n != 1:
            raise BadRequest(f"n={p.n}: {ENGINE_NAME} supports n=1 only; repeat the prompt instead")
        stops = [p.stop] if isinstance(p.stop, str) else (p.stop or [])
        if stops and self.tokenizer is None:
            raise BadRequest(f"stop={stops!r} is unavailable: the model folder has no tokenizer")
        if any(not s for s in stops):
            raise BadRequest(f"stop={stops!r}: stop strings must be non-empty")
        if p.stop_token_ids and any(type(t) is not int for t in p.stop_token_ids):
            raise BadRequest(f"stop_token_ids={p.stop_token_ids!r}: must be ints")

    # ----------------------------------------------------------------------------------------- control

    def flush_cache(self) -> None:
        self.cache.flush()

    def load_weights(self, model_path: str | Path) -> None:
        """Load a save_pretrained folder's safetensors into the live model. Every tensor's name and shape is checked
        before anything is copied, so a mismatch raises BadRequest and leaves the model as it was."""
        from safetensors.torch import load_file

        path = Path(model_path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise BadRequest(f"no *.safetensors files in {str(path)!r}")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f))
        own = self.model.state_dict()
        unexpected = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state))
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise BadRequest(
                f"{path}: checkpoint does not match the model: unexpected {unexpected[:5]}, missing {missing[:5]}"
            )
        self._check_and_copy(state, str(path))
        self.model_path = str(path)

    def load_named_tensors(self, named: list[tuple[str, torch.Tensor]], source: str) -> None:
        """Load some of the model's tensors by Hugging Face name (one bucket of a group update; `source` names it in
        errors). Every name and shape is checked before anything is copied, so a bad bucket raises BadRequest and
        leaves the model as it was (earlier buckets of the same update stay loaded, as in SGLang). As SGLang's
        loader does, with tied embeddings "lm_head.weight" is skipped: "model.embed_tokens.weight" sets both."""
        tied = self.model.config.tie_word_embeddings
        state = {k: t for k, t in named if not (tied and k == "lm_head.weight")}
        self._check_and_copy(state, source)

    def _check_and_copy(self, state: dict[str, torch.Tensor], source: str) -> None:
        own = self.model.state_dict()
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise BadRequest(f"{source}: names the model does not have: {unexpected[:5]}")
        wrong = [(k, tuple(t.shape), tuple(own[k].shape)) for k, t in state.items() if t.shape != own[k].shape]
        if wrong:
            raise BadRequest(f"{source}: shape mismatch (name, sent, model): {wrong[:5]}")
        with torch.no_grad():
            for k, t in state.items():
                own[k].copy_(t.to(dtype=own[k].dtype))

    def server_info(self) -> dict[str, Any]:
        return {
            "engine": ENGINE_NAME,
            "model_path": self.model_path,
            "weight_version": self.weight_version,
            "device": str(self.device),
            "tp_size": 1,  # SGLang's server_args field: ranks this server adds to a weight-update group
            "dp_size": 1,
            "dtype": self.cfg.dtype,
            "max_batch": self.cfg.max_batch,
            "enable_prefix_cache": self.cfg.enable_prefix_cache,
            "cache_tokens_capacity": self.cfg.cache_tokens,
            "cache_tokens_used": self.cache.total_tokens,
            "cache_nodes": self.cache.node_count(),
            "vocab_size": self.vocab_size,
            "context_length": self.context_len,
            "eos_token_ids": sorted(self.eos_ids),
            "return_original_logprob": self.cfg.return_original_logprob,
            "skip_tokenizer_init": self.tokenizer is None,
            "running": len(self.running),
            "waiting": len(self.waiting),
            **self.stats,
            "cache_hit_rate": self.stats["cached_tokens"] / max(1, self.stats["prompt_tokens"]),
        }

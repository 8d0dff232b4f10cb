"""The CPU development engine: transformers generation with a token-level radix prefix cache and batched decode.

It serves the subset of SGLang's `/generate` that `shared/engine_protocol.py` describes, with SGLang's semantics,
so the trainer's engine client runs unchanged against it and against real SGLang (DESIGN §3). It is synchronous
and single-threaded by contract: one worker thread (owned by `app.EngineService`) calls every method; nothing here
takes a lock. `Engine.generate` runs requests to completion for in-process callers (bench, tests).

Scheduling (SGLang-like continuous batching). `step(new)` admits waiting requests while fewer than `max_batch`
run, prefilling each one alone on top of its cached prefix; then it runs ONE decode step for every running
sequence as a single padded batch; it returns the requests that finished. Running sequences share one KV buffer
per layer, `[batch, kv_heads, capacity, head_dim]`, left-padded so every row ends at the same column; the padding
is masked (2-D attention mask) and each row gets its true position id, so a request's tokens do not depend on
what it is batched with (up to float rounding). Buffers grow by doubling (transformers' DynamicCache re-concatenates
the whole cache on every token, measured 5x slower per decode step at 16 x 2k tokens on these machines).

Prefix cache (`RadixKVCache`). A radix tree over token ids whose nodes hold the K/V of their token segment for
every layer. Lookup returns the longest cached prefix of a prompt, capped at `len(prompt) - 1` (the last prompt
token is always recomputed: its logits give the first output token; SGLang caps the same way), and
`meta_info.cached_tokens` is exactly that count. The prompt's KV is inserted right after its prefill, so branches
of one node admitted in the same step already hit it, and prompt + output[:-1] (every token whose KV exists; the
last sampled token was never fed) is inserted when a request finishes, so the next turn of an episode, which
re-sends prompt + output + observation, hits it. The tree holds at most `cache_tokens` tokens: least recently used
leaves are evicted first. `flush_cache` empties it; a weight update flushes it (unless asked not to, as in SGLang).

Sampling semantics, checked against SGLang 0.5.x `srt/layers/sampler.py` and `srt/sampling/sampling_params.py`:
- temperature < 1e-6 means greedy: SGLang rewrites it to temperature 1, top_k 1; the token is the argmax.
- Otherwise logits are divided by the temperature, softmaxed, then filtered top-k first, renormalised, top-p
  (smallest set whose mass reaches top_p), then min-p relative to the top token (flashinfer's default order,
  `top_k_top_p_sampling_from_probs(filter_apply_order="top_k_first")` / `top_k_renorm_prob` + `top_p_renorm_prob`
  + `min_p_sampling_from_probs`); the token is drawn from what is left.
- The returned logprob (`output_token_logprobs`) is SGLang's default (`SGLANG_RETURN_ORIGINAL_LOGPROB` unset):
  `log_softmax(logits / temperature)` at the sampled token, i.e. the temperature-scaled distribution BEFORE
  top-k/top-p/min-p truncation (`logprobs = torch.log(probs)` on the scaled softmax), and plain
  `log_softmax(logits)` for greedy requests. `return_original_logprob=True` mirrors the env flag: always the
  untempered `log_softmax(logits)`. (SGLang's all-greedy batch path also uses the raw distribution, so a greedy
  request's logprob is the same whatever it is batched with; so it is here.)
- Finish checks after each token, in SGLang's order: `max_new_tokens` reached -> "length"; else, unless
  `ignore_eos` (which in SGLang also disables `stop_token_ids`), the token is an EOS id (config,
  generation_config, tokenizer) or in `stop_token_ids` -> "stop" with `matched` = that id; else a stop string
  occurs in the decoded tail of the output (the last `max tokens of a stop string + 1` tokens, special tokens
  kept) -> "stop" with `matched` = the string. `output_ids` always keep the tokens that matched; only `text` is
  trimmed (the stop token dropped / the text cut at the stop string) unless `no_stop_trim`.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, DynamicLayer

from shared.engine_protocol import FinishReason, GenerateResponse, MetaInfo, SamplingParams

ENGINE_NAME = "trace-cpu-engine"
# SGLang's _SAMPLING_EPS: a temperature below it is greedy.
SAMPLING_EPS = 1e-6
# Initial spare columns in a fresh KV buffer; it doubles when full (amortised O(1) per token).
_KV_HEADROOM = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [kv_heads, tokens, head_dim]


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
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    t_submit: float = field(default_factory=time.perf_counter)
    aborted: bool = False
    abort_message: str = "aborted by request"
    future: Any = None  # set by the async layer; the engine never touches it


# --------------------------------------------------------------------------------------------- prefix cache


class _Node:
    __slots__ = ("children", "kv", "last_used", "parent", "tokens")

    def __init__(self, tokens: tuple[int, ...], kv: KV, parent: _Node | None) -> None:
        self.tokens = tokens
        self.kv = kv
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.last_used = 0


class RadixKVCache:
    """A radix tree over token ids holding per-layer K/V for each node's segment (see module docstring).

    Invariants: a node's `kv` tensors have exactly `len(tokens)` columns; children are keyed by the first token
    of their segment; `total_tokens` is the sum of segment lengths and stays <= `capacity` after every insert.
    `match` hands out views that the caller copies at once, so eviction never invalidates a running sequence.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.root = _Node((), [], None)
        self.total_tokens = 0
        self._clock = itertools.count(1)

    def flush(self) -> None:
        self.root = _Node((), [], None)
        self.total_tokens = 0

    def _walk(self, ids: Sequence[int]) -> tuple[int, list[tuple[_Node, int]]]:
        """Longest cached prefix of `ids`: (length, [(node, tokens used from it)])."""
        node, i, path = self.root, 0, []
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                break
            seg = child.tokens
            n = min(len(seg), len(ids) - i)
            if tuple(ids[i : i + n]) == seg[:n]:
                used = n
            else:
                used = next(j for j in range(n) if ids[i + j] != seg[j])
            path.append((child, used))
            i += used
            if used < len(seg):
                break
            node = child
        return i, path

    def match(self, ids: Sequence[int], limit: int) -> tuple[int, list[KV]]:
        """Longest cached prefix of `ids`, at most `limit` tokens: (length, its KV as consecutive segments).

        Each segment is a per-layer list of (keys, values) views [kv_heads, n_i, head_dim] into the tree; the views
        stay valid until the next `insert` or `flush`, so copy them before either (`Engine._prefill` does)."""
        n, path = self._walk(ids[:limit])
        now = next(self._clock)
        for node, _ in path:
            node.last_used = now
        return n, [[(k[:, :used], v[:, :used]) for k, v in node.kv] for node, used in path if used]

    @staticmethod
    def concat(segments: list[KV]) -> KV:
        """Join `match`'s segments into one KV (a copy)."""
        return [
            (torch.cat([seg[i][0] for seg in segments], dim=1), torch.cat([seg[i][1] for seg in segments], dim=1))
            for i in range(len(segments[0]))
        ]

    def insert(self, ids: Sequence[int], kv_of: Callable[[int, int], KV]) -> None:
        """Cache `ids`; `kv_of(start, end)` gives the KV of ids[start:end] (called only for the uncached part)."""
        if self.capacity == 0 or not ids:
            return
        now = next(self._clock)
        node, i = self.root, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                kv = [(k.clone(), v.clone()) for k, v in kv_of(i, len(ids))]
                assert kv[0][0].shape[1] == len(ids) - i, f"kv has {kv[0][0].shape[1]} columns for {len(ids) - i} ids"
                leaf = _Node(tuple(ids[i:]), kv, node)
                leaf.last_used = now
                node.children[ids[i]] = leaf
                self.total_tokens += len(ids) - i
                break
            seg = child.tokens
            n = min(len(seg), len(ids) - i)
            used = n if tuple(ids[i : i + n]) == seg[:n] else next(j for j in range(n) if ids[i + j] != seg[j])
            if used < len(seg):
                child = self._split(child, used)
            child.last_used = now
            node, i = child, i + used
        self._evict()

    def _split(self, child: _Node, at: int) -> _Node:
        """Split `child` after `at` tokens; returns the new upper node (which keeps child's place)."""
        upper = _Node(child.tokens[:at], [(k[:, :at].clone(), v[:, :at].clone()) for k, v in child.kv], child.parent)
        upper.last_used = child.last_used
        assert child.parent is not None
        child.parent.children[child.tokens[0]] = upper
        child.tokens = child.tokens[at:]
        child.kv = [(k[:, at:].clone(), v[:, at:].clone()) for k, v in child.kv]
        child.parent = upper
        upper.children[child.tokens[0]] = child
        return upper

    def _evict(self) -> None:
        if self.total_tokens <= self.capacity:
            return
        leaves = []
        stack = [self.root]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if not n.children and n is not self.root:
                leaves.append((n.last_used, id(n), n))
        heapq.heapify(leaves)
        while self.total_tokens > self.capacity and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.tokens[0]]
            self.total_tokens -= len(leaf.tokens)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))

    def node_count(self) -> int:
        count, stack = 0, [self.root]
        while stack:
            n = stack.pop()
            count += len(n.children)
            stack.extend(n.children.values())
        return count


# --------------------------------------------------------------------------------------------- KV buffers


class _KVLayer(DynamicLayer):
    """One layer's batched KV in a preallocated buffer that doubles when full. transformers calls `update` with
    the new tokens' K/V for every row; `keys`/`values` are views of the filled columns."""

    def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, n: int) -> None:
        """Adopt buffers [batch, kv_heads, capacity, head_dim] whose first `n` columns are filled."""
        super().__init__()
        assert kbuf.shape == vbuf.shape and n <= kbuf.shape[2], f"{tuple(kbuf.shape)} {tuple(vbuf.shape)} n={n}"
        self.kbuf, self.vbuf, self.n = kbuf, vbuf, n
        self.device = kbuf.device
        self.is_initialized = True
        self._views()

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor, capacity: int) -> _KVLayer:
        """A layer holding a copy of k, v [batch, kv_heads, n, head_dim] with room for `capacity` columns."""
        b, h, n, d = k.shape
        kbuf, vbuf = k.new_zeros((b, h, max(capacity, n), d)), v.new_zeros((b, h, max(capacity, n), d))
        kbuf[:, :, :n] = k
        vbuf[:, :, :n] = v
        return cls(kbuf, vbuf, n)

    def _views(self) -> None:
        self.keys = self.kbuf[:, :, : self.n]
        self.values = self.vbuf[:, :, : self.n]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("_KVLayer is created initialized")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        add = key_states.shape[-2]
        if self.n + add > self.kbuf.shape[2]:
            self.reserve(max(2 * self.kbuf.shape[2], self.n + add))
        self.kbuf[:, :, self.n : self.n + add] = key_states
        self.vbuf[:, :, self.n : self.n + add] = value_states
        self.n += add
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n

    def reserve(self, capacity: int) -> None:
        if capacity <= self.kbuf.shape[2]:
            return
        b, h, _, d = self.kbuf.shape
        kbuf, vbuf = self.kbuf.new_zeros((b, h, capacity, d)), self.vbuf.new_zeros((b, h, capacity, d))
        kbuf[:, :, : self.n] = self.keys
        vbuf[:, :, : self.n] = self.values
        self.kbuf, self.vbuf = kbuf, vbuf
        self._views()


def _cache_from_segments(segments: list[KV], n: int, capacity: int) -> Cache:
    """A one-row transformers Cache over `_KVLayer`s holding the `n` tokens of `segments` (from
    `RadixKVCache.match`), copied once into buffers with room for `capacity` tokens."""
    layers = []
    for li in range(len(segments[0])):
        h, _, d = segments[0][li][0].shape
        kbuf = segments[0][li][0].new_zeros((1, h, max(capacity, n), d))
        vbuf = torch.zeros_like(kbuf)
        col = 0
        for seg in segments:
            k, v = seg[li]
            kbuf[0, :, col : col + k.shape[1]] = k
            vbuf[0, :, col : col + k.shape[1]] = v
            col += k.shape[1]
        assert col == n, f"segments hold {col} tokens, expected {n}"
        layers.append(_KVLayer(kbuf, vbuf, n))
    return Cache(layers=layers)


# --------------------------------------------------------------------------------------------- sampling


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generator: torch.Generator,
    *,
    original_logprob: bool = False,
) -> tuple[list[int], list[float]]:
    """Sample one token per row of `logits` [B, V] with SGLang's semantics; returns (tokens, logprobs).

    See the module docstring for the exact order of the filters and which distribution the logprob is from.
    """
    logits = logits.float()
    bsz, vocab = logits.shape
    greedy = [p.temperature < SAMPLING_EPS for p in params]
    temps = torch.tensor(
        [1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)], device=logits.device
    )
    logp = torch.log_softmax(logits / temps[:, None], dim=-1)
    argmax = logits.argmax(dim=-1)
    if all(greedy):
        tokens = argmax
    else:
        probs = logp.exp()
        top_k = [vocab if (g or p.top_k < 0) else min(p.top_k, vocab) for g, p in zip(greedy, params, strict=True)]
        top_p = [math.inf if (g or p.top_p >= 1.0) else p.top_p for g, p in zip(greedy, params, strict=True)]
        min_p = [0.0 if g else p.min_p for g, p in zip(greedy, params, strict=True)]
        if any(k < vocab for k in top_k) or any(p < math.inf for p in top_p) or any(m > 0.0 for m in min_p):
            sp, idx = probs.sort(dim=-1, descending=True)
            dev = logits.device
            ranks = torch.arange(vocab, device=dev)[None, :]
            sp = sp.masked_fill(ranks >= torch.tensor(top_k, device=dev)[:, None], 0.0)
            sp = sp / sp.sum(dim=-1, keepdim=True)  # top-k renorm
            before = sp.cumsum(dim=-1) - sp  # mass of strictly better tokens
            sp = sp.masked_fill(before > torch.tensor(top_p, device=dev)[:, None], 0.0)
            sp = sp.masked_fill(sp < sp[:, :1] * torch.tensor(min_p, device=dev)[:, None], 0.0)
            tokens = idx.gather(1, torch.multinomial(sp, 1, generator=generator)).squeeze(1)
        else:
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tokens = torch.where(torch.tensor(greedy, device=logits.device), argmax, tokens)
    if original_logprob:
        logp = torch.log_softmax(logits, dim=-1)
    lps = logp.gather(1, tokens[:, None]).squeeze(1)
    assert tokens.shape == (bsz,)
    return tokens.tolist(), lps.tolist()


# --------------------------------------------------------------------------------------------- engine


@dataclass(eq=False)
class _Seq:
    req: EngineRequest
    cached_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    length: int = 0  # tokens whose KV is in the running buffer (prompt + output[:-1])
    finish: FinishReason | None = None
    stop_strs: list[str] = field(default_factory=list)
    stop_tail: int = 0  # tokens of output to decode for the stop-string check
    stop_ids: frozenset[int] = frozenset()

    @property
    def all_ids(self) -> list[int]:
        return self.req.input_ids + self.output_ids


class Engine:
    """Owns the model, tokenizer, prefix cache and running batch. Single-threaded: see the module docstring."""

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
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.batch: Cache | None = None  # KV of `running`, left-padded: every row ends at its layers' column `n`
        self.mask: torch.Tensor | None = None  # [B, >= n + 1] 1 = real token, 0 = left padding
        # counters since start: prefill work saved by the cache, and how full decode batches were
        self.stats = {
            "requests": 0,
            "prompt_tokens": 0,
            "cached_tokens": 0,
            "generated_tokens": 0,
            "decode_steps": 0,
            "decode_rows": 0,
        }

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
        if p.n != 1:
            raise BadRequest(f"n={p.n}: {ENGINE_NAME} supports n=1 only; repeat the prompt instead")
        stops = [p.stop] if isinstance(p.stop, str) else (p.stop or [])
        if stops and self.tokenizer is None:
            raise BadRequest(f"stop={stops!r} is unavailable: the model folder has no tokenizer")
        if any(not s for s in stops):
            raise BadRequest(f"stop={stops!r}: stop strings must be non-empty")
        if p.stop_token_ids and any(type(t) is not int for t in p.stop_token_ids):
            raise BadRequest(f"stop_token_ids={p.stop_token_ids!r}: must be ints")

    # ----------------------------------------------------------------------------------------- scheduling

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def free_slots(self) -> int:
        """How many more requests `step` would admit now."""
        return max(0, self.cfg.max_batch - len(self.running) - len(self.waiting))

    def add(self, req: EngineRequest) -> None:
        self.waiting.append(self._new_seq(req))

    def _new_seq(self, req: EngineRequest) -> _Seq:
        p = req.params
        seq = _Seq(req)
        if p.stop:
            seq.stop_strs = [p.stop] if isinstance(p.stop, str) else list(p.stop)
            assert self.tokenizer is not None
            seq.stop_tail = 1 + max(len(self.tokenizer.encode(s, add_special_tokens=False)) for s in seq.stop_strs)
        if not p.ignore_eos:
            seq.stop_ids = self.eos_ids | frozenset(p.stop_token_ids or ())
        return seq

    def step(self, new: Sequence[EngineRequest] = ()) -> list[tuple[EngineRequest, GenerateResponse]]:
        """Admit `new` (and earlier waiting requests) up to max_batch, run one decode step; return the finished."""
        for req in new:
            self.add(req)
        done = self._take_aborted()
        admitted: list[tuple[_Seq, KV]] = []
        while self.waiting and len(self.running) + len(admitted) < self.cfg.max_batch:
            seq = self.waiting.popleft()
            kv = self._prefill(seq)
            if seq.finish is not None:
                done.append(seq)
                self._cache_finished(seq, kv)
            else:
                admitted.append((seq, kv))
        if admitted:
            self._merge(admitted)
        if self.running:
            self._decode()
            done += self._retire()
        return [(s.req, self._response(s)) for s in done]

    def generate(self, reqs: Sequence[EngineRequest]) -> list[GenerateResponse]:
        """Run `reqs` to completion (in-process use); answers in order."""
        for r in reqs:
            self.validate(r)
        pending = {id(r) for r in reqs}
        out: dict[int, GenerateResponse] = {}
        batch = list(reqs)
        while pending:
            for req, resp in self.step(batch):
                out[id(req)] = resp
                pending.discard(id(req))
            batch = []
        return [out[id(r)] for r in reqs]

    def abort_all(self, message: str = "aborted by request") -> None:
        for seq in [*self.running, *self.waiting]:
            seq.req.abort_message = message
            seq.req.aborted = True

    def _take_aborted(self) -> list[_Seq]:
        """Finish flagged requests: waiting ones never run, running ones leave the batch (their KV is not cached)."""
        done = []
        for seq in [s for s in self.waiting if s.req.aborted]:
            self.waiting.remove(seq)
            seq.finish = FinishReason(type="abort", message=seq.req.abort_message)
            done.append(seq)
        for seq in self.running:
            if seq.req.aborted and seq.finish is None:
                seq.finish = FinishReason(type="abort", message=seq.req.abort_message)
        return done + self._retire()

    def collect_aborted(self) -> list[tuple[EngineRequest, GenerateResponse]]:
        """Answer flagged requests without running the model (used while generation is paused)."""
        return [(s.req, self._response(s)) for s in self._take_aborted()]

    def reset(self) -> list[EngineRequest]:
        """Forget the running batch and the waiting queue (after a failed step, or at shutdown); returns their
        requests, unanswered. The prefix cache is kept: its entries were complete when inserted."""
        reqs = [s.req for s in [*self.running, *self.waiting]]
        self.running, self.batch, self.mask = [], None, None
        self.waiting.clear()
        return reqs

    def retract_all(self) -> int:
        """Move running sequences back to the front of the queue (KV dropped; recomputed on re-admission from
        prompt + output so far, under whatever weights are loaded then). Returns how many."""
        n = len(self.running)
        for seq in reversed(self.running):
            seq.length = 0
            self.waiting.appendleft(seq)
        self.running, self.batch, self.mask = [], None, None
        return n

    # ----------------------------------------------------------------------------------------- model work

    @torch.inference_mode()
    def _prefill(self, seq: _Seq) -> KV:
        """Compute KV for the sequence so far (prompt, plus output after a retract) on top of its cached prefix,
        sample its next token; returns its KV as [1, kv_heads, n, head_dim] per layer."""
        ids = seq.all_ids
        first = not seq.output_ids
        n_cached, segments = self.cache.match(ids, len(ids) - 1) if self.cfg.enable_prefix_cache else (0, [])
        if first:
            seq.cached_tokens = n_cached
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += len(ids)
            self.stats["cached_tokens"] += n_cached
        dev = self.device
        cache = _cache_from_segments(segments, n_cached, len(ids) + _KV_HEADROOM) if n_cached else None
        suffix = torch.tensor([ids[n_cached:]], device=dev)
        if cache is None:
            out = self.model(input_ids=suffix, use_cache=True, logits_to_keep=1)
            kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        else:
            out = self.model(input_ids=suffix, cache=cache, use_cache=True, logits_to_keep=1)
            kv = [(layer.keys, layer.values) for layer in cache.layers]
        assert kv[0][0].shape[2] == len(ids), f"prefill produced {kv[0][0].shape[2]} KV columns for {len(ids)} ids"
        seq.length = len(ids)
        if self.cfg.enable_prefix_cache and first:
            self.cache.insert(ids, lambda a, b: [(k[0, :, a:b], v[0, :, a:b]) for k, v in kv])
        if seq.req.params.max_new_tokens == 0:
            seq.finish = FinishReason(type="length", length=0)
        else:
            tokens, lps = sample_tokens(
                out.logits[:, -1], [seq.req.params], self.generator, original_logprob=self.cfg.return_original_logprob
            )
            self._append(seq, tokens[0], lps[0])
        return kv

    def _merge(self, admitted: list[tuple[_Seq, KV]]) -> None:
        """Add prefilled sequences to the running batch, re-padding every row on the left to a common end."""
        rows = [(s.length, kv) for s, kv in admitted]
        old_len = self.batch.layers[0].n if self.batch is not None else 0
        new_len = max([old_len, *(n for n, _ in rows)])
        n_old = len(self.running)
        bsz = n_old + len(rows)
        longest = max(
            s.req.params.max_new_tokens - len(s.output_ids) for s in [*self.running, *(a for a, _ in admitted)]
        )
        cap = new_len + min(max(longest, 1), _KV_HEADROOM)
        layers = []
        ref = admitted[0][1]
        for li in range(len(ref)):
            _, h, _, d = ref[li][0].shape
            k = ref[li][0].new_zeros((bsz, h, cap, d))
            v = ref[li][1].new_zeros((bsz, h, cap, d))
            if self.batch is not None:
                old = self.batch.layers[li]
                k[:n_old, :, new_len - old_len : new_len] = old.keys
                v[:n_old, :, new_len - old_len : new_len] = old.values
            for r, (n, kv) in enumerate(rows):
                k[n_old + r, :, new_len - n : new_len] = kv[li][0][0, :, :n]
                v[n_old + r, :, new_len - n : new_len] = kv[li][1][0, :, :n]
            layers.append(_KVLayer(k, v, new_len))
        mask = torch.zeros((bsz, cap), dtype=torch.long, device=self.device)
        for r, s in enumerate([*self.running, *(a for a, _ in admitted)]):
            mask[r, new_len - s.length : new_len] = 1
        self.batch = Cache(layers=layers)
        self.mask = mask
        self.running += [s for s, _ in admitted]

    @torch.inference_mode()
    def _decode(self) -> None:
        assert self.batch is not None and self.mask is not None
        n = self.batch.layers[0].n
        if n + 1 > self.mask.shape[1]:
            grown = self.mask.new_zeros((self.mask.shape[0], max(2 * self.mask.shape[1], n + 1)))
            grown[:, :n] = self.mask[:, :n]
            self.mask = grown
        self.mask[:, n] = 1
        dev = self.device
        tokens = torch.tensor([[s.output_ids[-1]] for s in self.running], device=dev)
        positions = torch.tensor([[s.length] for s in self.running], device=dev)
        out = self.model(
            input_ids=tokens,
            attention_mask=self.mask[:, : n + 1],
            position_ids=positions,
            cache=self.batch,
            use_cache=True,
        )
        for s in self.running:
            s.length += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(self.running)
        toks, lps = sample_tokens(
            out.logits[:, -1],
            [s.req.params for s in self.running],
            self.generator,
            original_logprob=self.cfg.return_original_logprob,
        )
        for s, t, lp in zip(self.running, toks, lps, strict=True):
            if s.finish is None:
                self._append(s, t, lp)

    def _append(self, seq: _Seq, token: int, logprob: float) -> None:
        seq.output_ids.append(token)
        seq.logprobs.append(logprob)
        self.stats["generated_tokens"] += 1
        p = seq.req.params
        if len(seq.output_ids) >= p.max_new_tokens:
            seq.finish = FinishReason(type="length", length=p.max_new_tokens)
        elif token in seq.stop_ids:
            seq.finish = FinishReason(type="stop", matched=token)
        elif seq.stop_strs:
            assert self.tokenizer is not None
            tail = self.tokenizer.decode(seq.output_ids[-seq.stop_tail :], skip_special_tokens=False)
            hit = next((s for s in seq.stop_strs if s in tail), None)
            if hit is not None:
                seq.finish = FinishReason(type="stop", matched=hit)

    def _retire(self) -> list[_Seq]:
        """Remove finished rows from the batch (caching their KV), trim all-padding columns on the left."""
        done = [s for s in self.running if s.finish is not None]
        if not done:
            return []
        assert self.batch is not None and self.mask is not None
        n = self.batch.layers[0].n
        for r, s in enumerate(self.running):
            if s.finish is not None:
                kv = [
                    (layer.keys[r : r + 1, :, n - s.length : n], layer.values[r : r + 1, :, n - s.length : n])
                    for layer in self.batch.layers
                ]
                self._cache_finished(s, kv)
        keep = [r for r, s in enumerate(self.running) if s.finish is None]
        self.running = [self.running[r] for r in keep]
        if not keep:
            self.batch, self.mask = None, None
            return done
        lead = n - max(s.length for s in self.running)  # columns that are padding in every remaining row
        idx = torch.tensor(keep, device=self.device)
        layers = []
        for layer in self.batch.layers:
            k = layer.keys[:, :, lead:].index_select(0, idx)
            v = layer.values[:, :, lead:].index_select(0, idx)
            layers.append(_KVLayer.of(k, v, layer.kbuf.shape[2] - lead))
        self.mask = self.mask[:, lead:].index_select(0, idx)
        self.batch = Cache(layers=layers)
        return done

    def _cache_finished(self, seq: _Seq, kv: KV) -> None:
        """Insert prompt + output[:-1] (the tokens whose KV exists) into the prefix cache."""
        if not self.cfg.enable_prefix_cache or seq.req.aborted:
            return
        ids = seq.all_ids[: seq.length]
        assert kv[0][0].shape[2] >= len(ids), f"{kv[0][0].shape[2]} KV columns for {len(ids)} ids"
        self.cache.insert(ids, lambda a, b: [(k[0, :, a:b], v[0, :, a:b]) for k, v in kv])

    def _response(self, seq: _Seq) -> GenerateResponse:
        req, p = seq.req, seq.req.params
        fin = seq.finish
        assert fin is not None
        text = ""
        if self.tokenizer is not None:
            ids = seq.output_ids
            if fin.type == "stop" and isinstance(fin.matched, int) and not p.no_stop_trim:
                ids = ids[:-1]
            text = self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens)
            if fin.type == "stop" and isinstance(fin.matched, str) and not p.no_stop_trim:
                pos = text.find(fin.matched)
                text = text[:pos] if pos != -1 else text
        meta = MetaInfo(
            id=req.rid,
            prompt_tokens=len(req.input_ids),
            completion_tokens=len(seq.output_ids),
            cached_tokens=seq.cached_tokens,
            finish_reason=fin,
            output_token_logprobs=[[lp, t, None] for lp, t in zip(seq.logprobs, seq.output_ids, strict=True)]
            if req.return_logprob
            else None,
            e2e_latency=time.perf_counter() - req.t_submit,
            weight_version=self.weight_version,
        )
        return GenerateResponse(output_ids=list(seq.output_ids), meta_info=meta, text=text)

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
        wrong = [(k, tuple(t.shape), tuple(own[k].shape)) for k, t in state.items() if t.shape != own[k].shape]
        if wrong:
            raise BadRequest(f"{path}: shape mismatch (name, checkpoint, model): {wrong[:5]}")
        with torch.no_grad():
            for k, t in state.items():
                own[k].copy_(t.to(dtype=own[k].dtype))
        self.model_path = str(path)

    def server_info(self) -> dict[str, Any]:
        return {
            "engine": ENGINE_NAME,
            "model_path": self.model_path,
            "weight_version": self.weight_version,
            "device": str(self.device),
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

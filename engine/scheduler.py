"""The scheduler: SGLang-like continuous batching and the decode loop, over the model `engine.Engine` loads.

Contract. `Scheduler` is the base class of `engine.Engine` and owns the request state: the `waiting` queue, the
`running` batch with its KV (`batch`, `mask`) and the `stats` counters. It reads the attributes annotated on the
class (model, tokenizer, prefix cache, generator, config, EOS ids, weight version), which `Engine.__init__` sets
before calling `Scheduler.__init__`. Like the rest of the engine it is synchronous and single-threaded by contract:
one worker thread (owned by `app.EngineService`) calls every method; nothing here takes a lock; only
`EngineRequest.aborted` may be set from another thread, and it is read at every step.

Scheduling. `step(new)` admits waiting requests while fewer than `max_batch` run, prefilling each one alone on top
of its cached prefix (`radix_cache.RadixKVCache`); then it runs ONE decode step for every running sequence as a
single padded batch; it returns the requests that finished. `generate` runs requests to completion for in-process
callers (bench, tests). Running sequences share one KV buffer per layer (`kv_buffer.KVLayer`),
`[batch, kv_heads, capacity, head_dim]`, left-padded so every row ends at the same column; the padding is masked
(2-D attention mask) and each row gets its true position id, so a request's tokens do not depend on what it is
batched with (up to float rounding). Tokens are drawn by `sampling.sample_tokens`.

Finishing. Finish checks run after each token, in SGLang's order: `max_new_tokens` reached -> "length"; else, unless
`ignore_eos` (which in SGLang also disables `stop_token_ids`), the token is an EOS id (config, generation_config,
tokenizer) or in `stop_token_ids` -> "stop" with `matched` = that id; else a stop string occurs in the decoded tail
of the output (the last `max tokens of a stop string + 1` tokens, special tokens kept) -> "stop" with `matched` =
the string. `output_ids` always keep the tokens that matched; only `text` is trimmed (the stop token dropped / the
text cut at the stop string) unless `no_stop_trim`. Aborted requests finish with "abort" and their KV is not cached.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache

from engine.kv_buffer import KV_HEADROOM, KVLayer, cache_from_segments
from engine.radix_cache import KV, RadixKVCache
from engine.sampling import sample_tokens
from shared.engine_protocol import FinishReason, GenerateResponse, MetaInfo

if TYPE_CHECKING:
    from engine.engine import EngineConfig, EngineRequest


@dataclass(eq=False)
class _Seq:
    req: EngineRequest
    cached_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[float, int]] | None] = field(default_factory=list)  # per output token, when asked
    length: int = 0  # tokens whose KV is in the running buffer (prompt + output[:-1])
    finish: FinishReason | None = None
    stop_strs: list[str] = field(default_factory=list)
    stop_tail: int = 0  # tokens of output to decode for the stop-string check
    stop_ids: frozenset[int] = frozenset()

    @property
    def all_ids(self) -> list[int]:
        return self.req.input_ids + self.output_ids


class Scheduler:
    """Continuous batching over `model`: the waiting queue, the running batch and its KV (see the module docstring)."""

    # Set by the subclass (`engine.Engine`) before `Scheduler.__init__`; read here, never replaced here.
    cfg: EngineConfig
    device: torch.device
    model: Any  # a transformers causal LM, in eval mode
    tokenizer: Any  # a transformers tokenizer, or None (then no stop strings and no `text`)
    eos_ids: frozenset[int]
    cache: RadixKVCache
    generator: torch.Generator
    weight_version: str

    def __init__(self) -> None:
        # transformers renamed the KV-cache argument and output field `past_key_values` to `cache` after 5.19, the
        # version the sglang extra pins: take whichever name this model's forward has
        params = inspect.signature(self.model.forward).parameters
        self.cache_kw = next((k for k in ("cache", "past_key_values") if k in params), "")
        assert self.cache_kw, (
            f"{type(self.model).__name__}.forward takes neither cache nor past_key_values: {list(params)}"
        )
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
        cache = cache_from_segments(segments, n_cached, len(ids) + KV_HEADROOM) if n_cached else None
        suffix = torch.tensor([ids[n_cached:]], device=dev)
        if cache is None:
            out = self.model(input_ids=suffix, use_cache=True, logits_to_keep=1)
            kv = [(layer.keys, layer.values) for layer in getattr(out, self.cache_kw).layers]
        else:
            out = self.model(input_ids=suffix, **{self.cache_kw: cache}, use_cache=True, logits_to_keep=1)
            kv = [(layer.keys, layer.values) for layer in cache.layers]
        assert kv[0][0].shape[2] == len(ids), f"prefill produced {kv[0][0].shape[2]} KV columns for {len(ids)} ids"
        seq.length = len(ids)
        if self.cfg.enable_prefix_cache and first:
            self.cache.insert(ids, lambda a, b: [(k[0, :, a:b], v[0, :, a:b]) for k, v in kv])
        if seq.req.params.max_new_tokens == 0:
            seq.finish = FinishReason(type="length", length=0)
        else:
            got = sample_tokens(
                out.logits[:, -1],
                [seq.req.params],
                self.generator,
                original_logprob=self.cfg.return_original_logprob,
                top_n=[seq.req.top_logprobs_num],
            )
            self._append(seq, got.tokens[0], got.logprobs[0], got.top[0])
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
        cap = new_len + min(max(longest, 1), KV_HEADROOM)
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
            layers.append(KVLayer(k, v, new_len))
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
            **{self.cache_kw: self.batch},
            use_cache=True,
        )
        for s in self.running:
            s.length += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(self.running)
        got = sample_tokens(
            out.logits[:, -1],
            [s.req.params for s in self.running],
            self.generator,
            original_logprob=self.cfg.return_original_logprob,
            top_n=[s.req.top_logprobs_num for s in self.running],
        )
        for s, t, lp, top in zip(self.running, got.tokens, got.logprobs, got.top, strict=True):
            if s.finish is None:
                self._append(s, t, lp, top)

    def _append(self, seq: _Seq, token: int, logprob: float, top: list[tuple[float, int]] | None = None) -> None:
        seq.output_ids.append(token)
        seq.logprobs.append(logprob)
        if seq.req.top_logprobs_num:
            seq.top.append(top)
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
            layers.append(KVLayer.of(k, v, layer.kbuf.shape[2] - lead))
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
            output_top_logprobs=[[[lp, t, None] for lp, t in row] if row is not None else None for row in seq.top]
            if req.return_logprob and req.top_logprobs_num
            else None,
            e2e_latency=time.perf_counter() - req.t_submit,
            weight_version=self.weight_version,
        )
        return GenerateResponse(output_ids=list(seq.output_ids), meta_info=meta, text=text)

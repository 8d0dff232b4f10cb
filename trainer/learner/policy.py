"""The policy being trained: model + optimizer prepared by accelerate, and the three things the loop
asks of it — prefix features for the predictor, an RL update on tree samples, an SFT update — plus
weight export for the engine.

accelerate owns device placement, mixed precision, DDP/FSDP and gradient accumulation, so the same
code runs on a laptop CPU (fp32) and under `accelerate launch` on GPUs (bf16). Gradients are
accumulated over the whole step's samples (micro-batches of at most `optim.micro_batch_size` sequences
and `optim.micro_batch_tokens` padded tokens) and the loss of each micro-batch is scaled by its share of
the step's weighted tokens, so one optimizer step sees the token-mean loss over everything sampled,
whatever the batching. Under FSDP2 each micro-batch's gradient is reduce-scattered in float32 into the
rank's shard (no unsharded gradient is kept between micro-batches); token logprobs come from the LM head
in chunks (`trainer.learner.loss.LogprobHead`), never as the whole logits matrix.

A `threading.Lock` guards the weights: the update, saves and `hidden_at` hold it, and so does `FeatureModel.sync`,
which copies the weights into the frozen copy that computes the next step's rollout features on a thread of its
own while this step trains (`run.max_staleness >= 1`, `trainer.learner.compute`), so no one sees half-updated weights.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState, init_empty_weights
from accelerate.utils import DistributedType
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from trainer.learner.config import ModelConfig, OptimConfig, uses_cpu
from trainer.learner.distributed import Ranks, current, fsdp_requested, launched_ranks, micro_batch_plan
from trainer.learner.loss import HeadSignals, install_logprob_head, policy_loss, sequence_logprobs
from trainer.learner.packing import Packed, forest_logprobs, pack_prefixes, packed_plan
from trainer.learner.samples import TrainSample

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def save_dtype(name: str, model_path: str | Path) -> torch.dtype:
    """`model.save_dtype` resolved: "auto" reads the dtype `model_path` was stored in (float32 when it says none)."""
    if name == "auto":
        stored = getattr(AutoConfig.from_pretrained(str(model_path)), "dtype", None)
        if isinstance(stored, torch.dtype):
            return stored
        name = str(stored or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"model.save_dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def pad_rows(seqs: Sequence[Sequence[Any]], value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Right-pad `seqs` with `value` to the longest one's length: a (len(seqs), width) tensor on `device`."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=dtype)
    return out.to(device)


class Policy:
    """The model being trained, on this rank. On several ranks (`trainer.learner.distributed`) rank 0's methods announce
    themselves to the followers first, and every method that needs the other ranks (the updates, `hidden_at`, the
    weight stream behind `save`, `weight_stream` and `engine_weights`, `save_state` / `load_state`, the optimizer
    state) is a collective they join; the followers call the same methods with the data arguments left out (rank 0
    scatters their shares)."""

    def __init__(
        self,
        model_path: str | Path,
        mcfg: ModelConfig,
        ocfg: OptimConfig,
        *,
        seed: int = 0,
        temperature: float = 1.0,
        reference: str | Path | None = None,
        ranks: Ranks | None = None,
    ) -> None:
        """reference: the model (folder or hub id) of the frozen KL reference (optim.kl_coef > 0), default
        `model_path`. A resumed run passes the weights it started from, so the KL term keeps pulling towards them
        and not towards the checkpoint. `self.reference` records it (a local folder as an absolute path).
        ranks: the training ranks (default: this process's, `trainer.learner.distributed.current()`)."""
        self.ranks = ranks or current()
        kwargs = dict(seed=seed, temperature=temperature, reference=None if reference is None else str(reference))
        self.ranks.announce("policy", model_path=str(model_path), mcfg=mcfg, ocfg=ocfg, **kwargs)
        cpu = uses_cpu(mcfg)
        mp = mcfg.mixed_precision
        if mp == "auto":
            mp = "no" if cpu else "bf16"
        self.accelerator = _accelerator(cpu, mp)
        self.sharded = self.accelerator.distributed_type == DistributedType.FSDP
        torch.manual_seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.dtype: torch.dtype = getattr(torch, mcfg.dtype)  # the master weights and the loss (model.dtype)
        model = _build_model(model_path, self.dtype, empty=self.sharded and not self.ranks.leader)
        install_logprob_head(model)  # token logprobs in chunks, never the whole logits matrix (issue 21)
        self.chunk = mcfg.logprob_chunk
        self.save_dtype = save_dtype(mcfg.save_dtype, model_path)
        if mcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.ocfg = ocfg
        if self.sharded and ocfg.kl_coef > 0:
            raise ValueError(
                f"optim.kl_coef={ocfg.kl_coef} under FSDP: the KL reference is a replicated copy, not sharded yet; "
                "set optim.kl_coef = 0, or train with DDP (configs/accelerate/ddp.yaml)"
            )
        opt = torch.optim.AdamW(model.parameters(), lr=ocfg.lr, weight_decay=ocfg.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, opt)
        self.lock = threading.Lock()
        # The weight version: RL updates pushed to the engines so far (0 = the starting weights). The loop advances
        # it with each push; samples are judged stale against it (trainer.algo.staleness).
        self.version = 0
        # Logprobs are taken under the sampling temperature, the distribution the engine sampled from.
        self.temperature = temperature if temperature > 0 else 1.0
        self.ref_model = None
        ref_path = Path(reference if reference is not None else model_path)
        self.reference: str | None = str(ref_path.resolve() if ref_path.exists() else ref_path)
        if ocfg.kl_coef > 0:  # a frozen copy of the starting policy for the KL term
            if reference is None or ref_path.resolve() == Path(model_path).resolve():
                ref = copy.deepcopy(self.accelerator.unwrap_model(self.model))
            else:
                ref = AutoModelForCausalLM.from_pretrained(str(reference), dtype=self.dtype).to(self.device)
                install_logprob_head(ref)
            if mp == "bf16":  # it only runs forward under autocast: half the memory of an fp32 copy
                for p in ref.parameters():  # parameters only: RoPE's inv_freq buffer stays float32, as in the policy
                    p.data = p.data.to(torch.bfloat16)
            self.ref_model = ref.eval().requires_grad_(False)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.bucket_bytes = mcfg.weight_bucket_mb << 20
        # Under FSDP, the feature copy (`FeatureModel`) takes the weights from the streams that feed it (`save` and
        # `weight_stream` with feed=True: the loop's hand-off to the engines), since no rank holds them whole.
        self.feature_taps: list[FeatureModel] = []

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world_size(self) -> int:
        return self.ranks.size

    def set_lr(self, lr: float) -> None:
        """The optimizer's rate; on several ranks it reaches the followers with the next update."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ predictor features
    @torch.no_grad()
    def hidden_at(
        self,
        seqs: Sequence[list[int]] | None = None,
        positions: Sequence[list[int]] | None = None,
        batch: int = 16,
        signals: tuple[int, float] | None = None,
    ) -> list[torch.Tensor]:
        """Last-layer hidden state at each given position of each sequence: one [len(pos_i), H] float32
        tensor per sequence (CPU). One forward per sequence, batched by length under the update's limits (at most
        `batch` sequences and optim.micro_batch_tokens padded tokens a forward); no gradient. On several ranks every
        rank computes a token-balanced share of the sequences (DDP: on its own replica; FSDP: with the same number of
        forwards, whose all-gathers the ranks share) and rank 0 gathers them (the followers get []).
        signals = (token, temperature): [len(pos_i), H + 2], the hidden state then log p(token next) and the
        next-token entropy at each position, from the same forward (`_hidden_states`)."""
        if not self.ranks.many:
            assert seqs is not None and positions is not None
            with self.lock:
                model = self.accelerator.unwrap_model(self.model)  # not DDP's forward: it would sync buffers
                model.eval()
                try:
                    forwards = self.own_forwards(seqs, batch)
                    return _hidden_states(
                        model, self.accelerator, self.pad_id, seqs, positions, forwards, signals, self.chunk
                    )
                finally:
                    model.train()
        self.ranks.announce("hidden_at", batch=batch, signals=signals)
        parts = None
        if self.ranks.leader:
            assert seqs is not None and positions is not None
            plan, n_fw = self._micro_batch_plan([len(s) for s in seqs], rows=batch)
            parts = [
                ([[seqs[i] for i in b] for b in fws], [[positions[i] for i in b] for b in fws], n_fw) for fws in plan
            ]
        my_seqs, my_pos, n_fw = self.ranks.scatter(parts)
        pad = n_fw - len(my_seqs)  # the same number of forwards (all-gathers) on every rank: blank ones
        flat_seqs: list[list[int]] = []
        flat_pos: list[list[int]] = []
        fws = []
        for b_seqs, b_pos in [*zip(my_seqs, my_pos, strict=True), *[([[self.pad_id]], [[0]])] * pad]:
            fws.append(list(range(len(flat_seqs), len(flat_seqs) + len(b_seqs))))
            flat_seqs += b_seqs
            flat_pos += b_pos
        model = self.model if self.sharded else self.accelerator.unwrap_model(self.model)  # DDP: its replica
        with self.lock:
            model.eval()
            try:
                hs = _hidden_states(model, self.accelerator, self.pad_id, flat_seqs, flat_pos, fws, signals, self.chunk)
                hs = hs[: len(flat_seqs) - pad]
            finally:
                model.train()
        gathered = self.ranks.gather(hs)
        if gathered is None:
            return []
        out: list[torch.Tensor | None] = [None] * len(seqs or [])
        for fws_r, part in zip(plan, gathered, strict=True):
            for i, h in zip([i for b in fws_r for i in b], part, strict=True):
                out[i] = h
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ RL update
    def rl_update(self, samples: Sequence[TrainSample] | None = None, lr: float | None = None) -> dict[str, float]:
        """One optimizer step per PPO epoch over all samples; returns averaged loss metrics (over all ranks)."""
        if self.ranks.leader:
            if not samples:
                return {"loss": 0.0, "trained_tokens": 0.0}
            self.ranks.announce("rl_update", lr=self.lr)
        elif lr is not None:
            self.set_lr(lr)
        # Per-sample factor on the token weights: 1 (token-mean) or 1 / the sample's trained tokens (seq-mean).
        seq = self.ocfg.loss_agg == "seq-mean-token-mean"

        def scale(s: TrainSample) -> float:
            return 1.0 / max(1, sum(s.loss_mask)) if seq else 1.0

        parts = None
        if self.ranks.leader:
            assert samples is not None
            total_w = sum(sum(s.weights) * scale(s) for s in samples)
            assert total_w > 0, f"{len(samples)} samples carry no weighted tokens"
            if self.ocfg.share_prefixes:  # a prompt's samples share micro-batches
                seqs, groups = [s.input_ids for s in samples], [s.prompt_id for s in samples]
                mbs, budget = self.ocfg.micro_batch_size, self.ocfg.micro_batch_tokens
                plan, n_mb = packed_plan(seqs, groups, self.ranks.size, mbs, budget)
            else:
                plan, n_mb = self._micro_batch_plan([len(s) for s in samples])
            parts = [([[samples[i] for i in mb] for mb in batches], total_w, n_mb) for batches in plan]
        batches, total_w, n_mb = self.ranks.scatter(parts)
        # N ranks: DDP / FSDP average the ranks' gradients, so each loss is scaled by N to sum them instead.
        gain = float(self.ranks.size)
        agg: dict[str, float] = {}
        with self.lock:
            self.model.train()
            old: dict[int, torch.Tensor] = {}  # micro-batch -> its logprobs at the first epoch (PPO's pi_old)
            packs: dict[int, Packed] = {}  # micro-batch -> its packed rows and mask (optim.share_prefixes), built once
            for epoch in range(self.ocfg.ppo_epochs):
                self.optimizer.zero_grad(set_to_none=True)
                for k in range(n_mb):
                    blank = k >= len(batches)
                    chunk = [self._blank_sample()] if blank else batches[k]  # blank: zero weight, joins the sync
                    ids = pad_rows([s.input_ids for s in chunk], self.pad_id, torch.long, self.device)
                    att = pad_rows([[1] * len(s) for s in chunk], 0, torch.long, self.device)
                    # sequence_logprobs()[b, t] is the logprob of token t, so per-token tensors align as they are.
                    mask = pad_rows([s.loss_mask for s in chunk], 0, self.dtype, self.device)
                    adv = pad_rows([s.advantages for s in chunk], 0.0, self.dtype, self.device)
                    w = pad_rows([s.weights for s in chunk], 0.0, self.dtype, self.device)
                    w = w * torch.tensor([scale(s) for s in chunk], dtype=self.dtype, device=self.device)[:, None]
                    eng = pad_rows([s.engine_logprobs for s in chunk], 0.0, self.dtype, self.device)
                    if self.ocfg.share_prefixes and k not in packs:  # one row a prompt
                        packs[k] = pack_prefixes([s.input_ids for s in chunk], [s.prompt_id for s in chunk])
                    packed = packs.get(k)
                    with self._sync_unless(k == n_mb - 1):
                        with self.accelerator.autocast():
                            logp = self._logprobs(self.model, ids, att, mask, packed)
                        logp = logp.to(self.dtype)
                        if epoch == 0:
                            old[k] = logp.detach()
                        old_lp = old[k]
                        ref_lp = None
                        if self.ref_model is not None:
                            with torch.no_grad(), self.accelerator.autocast():
                                ref_lp = self._logprobs(self.ref_model, ids, att, mask, packed).to(self.dtype)
                        loss, m = policy_loss(
                            logp,
                            old_lp,
                            eng,
                            adv,
                            w,
                            mask,
                            clip_eps=self.ocfg.clip_eps,
                            clip_eps_high=self.ocfg.clip_eps_high,
                            tis_cap=self.ocfg.tis_cap,
                            kl_coef=self.ocfg.kl_coef,
                            ref_logp=ref_lp,
                        )
                        share = float((w * mask).sum()) / total_w
                        self.accelerator.backward(loss * (share * gain))
                    for key, v in m.items():  # means weighted by each call's share; "tokens" (weights) add up
                        f = 1.0 if key == "tokens" else share
                        agg[key] = agg.get(key, 0.0) + float(v) * f / self.ocfg.ppo_epochs
                    agg["loss"] = agg.get("loss", 0.0) + float(loss.detach()) * share / self.ocfg.ppo_epochs
                gn = self.accelerator.clip_grad_norm_(self.model.parameters(), self.ocfg.grad_clip)
                self.optimizer.step()
        agg["trained_tokens"] = float(sum(sum(s.loss_mask) for mb in batches for s in mb))
        agg = self.ranks.sum(agg)
        agg["grad_norm"] = float(gn) if gn is not None and math.isfinite(float(gn)) else float("nan")
        return agg

    def _logprobs(
        self, model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, mask: torch.Tensor, packed: Packed | None
    ) -> torch.Tensor:
        """The update's token logprobs [B, T] at the loss mask's tokens: from the padded batch, or from its packed
        row (`optim.share_prefixes`), which computes each shared prefix token once."""
        if packed is not None:
            return forest_logprobs(model, packed, mask, temperature=self.temperature, chunk=self.chunk)
        return sequence_logprobs(model, ids, att, temperature=self.temperature, needed=mask, chunk=self.chunk)

    def own_forwards(self, seqs: Sequence[list[int]], batch: int) -> list[list[int]]:
        """One process's `hidden_at` forwards over `seqs` (indices, by length): at most `batch` sequences and
        optim.micro_batch_tokens padded tokens each, as the update's micro-batches."""
        return micro_batch_plan([len(s) for s in seqs], 1, batch, self.ocfg.micro_batch_tokens)[0][0]

    def _micro_batch_plan(self, lengths: Sequence[int], rows: int | None = None) -> tuple[list[list[list[int]]], int]:
        """Each rank's micro-batches (indices into `lengths`) and the count every rank runs: token-balanced shares
        cut by optim.micro_batch_size rows (or `rows`) and optim.micro_batch_tokens padded tokens."""
        return micro_batch_plan(
            lengths, self.ranks.size, rows or self.ocfg.micro_batch_size, self.ocfg.micro_batch_tokens
        )

    def _blank_sample(self) -> TrainSample:
        """A micro-batch row that trains nothing (weight 0): a rank with fewer micro-batches runs these, so that
        every rank joins every gradient sync."""
        z = [0, 0]
        return TrainSample(
            [self.pad_id] * 2, z, [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], prompt_id="", tree_index=-1, leaf_id=-1
        )

    def _sync_unless(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradient accumulation on several ranks. DDP: no gradient sync but at the step's last micro-batch (its
        gradients are replicated anyway, and one all-reduce a step is cheapest). FSDP2: a reduce-scatter at every
        micro-batch, so each rank holds only its shard of the gradient between micro-batches, accumulated in the
        shard's float32 (`no_sync` there, `set_requires_gradient_sync(False)`, keeps every rank's whole unsharded
        gradient across micro-batches, summed in the compute dtype: 16.4 GB a rank in bf16 for Qwen3-8B; issue 21)."""
        if last or not self.ranks.many or self.sharded:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    # ------------------------------------------------------------------ SFT
    def sft_update(
        self,
        input_ids: Sequence[list[int]] | None = None,
        loss_mask: Sequence[list[float]] | None = None,
        micro_batch_size: int | None = None,
        lr: float | None = None,
    ) -> float:
        """One optimizer step of next-token cross-entropy, the mean over the batch's tokens weighted by
        `loss_mask` (1 = trained, 0 = not, or a weight in between); returns the loss. The batch is cut into
        micro-batches of similar length (sorted; `micro_batch_size` sequences each, default
        optim.micro_batch_size) so little is padding, and logits are computed only where a token is trained: the
        same gradient as one padded batch, at about half the cost on the tiny demo. On several ranks each trains
        a token-balanced share, as `rl_update` does."""
        mb = micro_batch_size or self.ocfg.micro_batch_size
        parts = None
        if self.ranks.leader:
            self.ranks.announce("sft_update", micro_batch_size=mb, lr=self.lr)
            assert input_ids is not None and loss_mask is not None
            total = sum(sum(m) for m in loss_mask)
            plan, n_mb = self._micro_batch_plan([len(x) for x in input_ids], rows=mb)
            parts = [
                (
                    [[input_ids[i] for i in b] for b in batches],
                    [[loss_mask[i] for i in b] for b in batches],
                    total,
                    n_mb,
                )
                for batches in plan
            ]
        elif lr is not None:
            self.set_lr(lr)
        my_ids, my_mask, total, n_mb = self.ranks.scatter(parts)
        gain = float(self.ranks.size)
        loss_sum = 0.0
        with self.lock:
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            for k in range(n_mb):
                blank = k >= len(my_ids)
                rows = [[self.pad_id] * 2] if blank else my_ids[k]  # a blank row: only joins the sync
                masks = [[0.0, 0.0]] if blank else my_mask[k]
                ids = pad_rows(rows, self.pad_id, torch.long, self.device)
                att = pad_rows([[1] * len(x) for x in rows], 0, torch.long, self.device)
                mask = pad_rows(masks, 0, self.dtype, self.device)
                with self._sync_unless(k == n_mb - 1):
                    with self.accelerator.autocast():
                        logp = sequence_logprobs(self.model, ids, att, needed=mask, chunk=self.chunk)
                    loss = -(logp.to(self.dtype) * mask).sum() / max(total, 1)
                    self.accelerator.backward(loss * gain)
                loss_sum += float(loss.detach())
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.ocfg.grad_clip)
            self.optimizer.step()
        return self.ranks.sum({"loss": loss_sum})["loss"]

    # ------------------------------------------------------------------ weights
    def _engine_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of what the engines load, in state-dict order: this rank's view (a DTensor shard under
        FSDP2: no gather), less a tied LM head (engines tie it from the embedding, as `save_pretrained` drops it)."""
        model = self.accelerator.unwrap_model(self.model)
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            names = {id(m): n for n, m in model.named_modules()}
            head = names.get(id(model.get_output_embeddings()))
            state.pop(f"{head}.weight", None)
        return list(state.items())

    def weight_plan(self, dtype: torch.dtype | None = None, bucket_bytes: int | None = None) -> list[list[str]]:
        """The names of `_engine_tensors` in buckets of at most `bucket_bytes` (default model.weight_bucket_mb) in
        `dtype` (default model.save_dtype): consecutive tensors, a bigger one alone. From the shapes: no gather."""
        limit = bucket_bytes if bucket_bytes is not None else self.bucket_bytes
        assert limit >= 1, f"bucket_bytes={limit}"
        size = torch.empty(0, dtype=dtype or self.save_dtype).element_size()
        plan: list[list[str]] = []
        held = 0
        for name, t in self._engine_tensors():
            nbytes = t.numel() * (size if t.is_floating_point() else t.element_size())
            if not plan or (held + nbytes > limit and plan[-1]):
                plan.append([])
                held = 0
            plan[-1].append(name)
            held += nbytes
        return plan

    @torch.no_grad()
    def _weight_stream(
        self, dtype: torch.dtype, bucket_bytes: int | None, to_host: bool, feed: bool
    ) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        """The weights, one bucket of `weight_plan` at a time, on every rank: each tensor cast to `dtype` on the
        training device (under FSDP2 its shard, then an all-gather of the cast shards: the same calls in the same
        order on every rank, moving half the bytes of float32 for bf16) and, on rank 0, moved to host memory when
        `to_host`; the followers drop theirs. Yields
        on rank 0 only. feed: the feature copy (`FeatureModel`, under FSDP) takes each bucket too. Closed early, it
        still runs every remaining gather, so the ranks stay in step."""
        if not self.ranks.leader and not self.sharded:
            return  # a DDP follower: nothing to gather, rank 0 holds the whole model
        entries = dict(self._engine_tensors())
        plan = self.weight_plan(dtype, bucket_bytes)
        taps = list(self.feature_taps) if feed else []
        for tap in taps:
            tap.begin()
        closed = False
        try:
            for names in plan:
                out: list[torch.Tensor] = []
                with self.lock:
                    for name in names:
                        t = entries[name].detach()
                        t = t.to(dtype) if t.is_floating_point() else t  # a copy unless it is in dtype already
                        if isinstance(t, DTensor):  # cast first (the shard): the all-gather moves the engines' dtype
                            t = t.full_tensor()  # every rank: the whole tensor on its device, for this tensor only
                        if not self.ranks.leader:
                            continue
                        out.append(t.to("cpu") if to_host else t)  # read before the next update: no copy needed
                if not self.ranks.leader:
                    continue
                for tap in taps:  # after a close too: the feature copy never keeps half a version
                    tap.load(names, out)
                if closed:
                    continue
                try:
                    yield names, out
                except GeneratorExit:
                    closed = True  # the consumer stopped: finish the gathers (the followers are in them), drop the rest
                del out
        finally:
            for tap in taps:
                tap.end()

    def weight_stream(
        self, bucket_bytes: int | None = None, *, to_host: bool = True, feed: bool = False
    ) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        """(names, tensors) buckets of the engines' weights in model.save_dtype, on rank 0 (`_weight_stream`): what a
        push over the weight group sends. Consume it whole, on one thread (every step is a collective under FSDP)."""
        self.ranks.announce("join_weight_stream", bucket_bytes=bucket_bytes, to_host=to_host, feed=feed)
        yield from self._weight_stream(self.save_dtype, bucket_bytes, to_host, feed)  # announced at the first next()

    def join_weight_stream(self, bucket_bytes: int | None = None, to_host: bool = True, feed: bool = False) -> None:
        """A follower's side of `weight_stream`."""
        for _ in self._weight_stream(self.save_dtype, bucket_bytes, to_host, feed):
            pass

    def engine_weights(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
        """The engines' weights as one dict on rank 0's CPU (None on the followers), from the stream, copied (never
        the live parameters): the whole model in host memory, for tests and small models; `save` and the weight
        group never build it."""
        self.ranks.announce("engine_weights", dtype=dtype)
        out: dict[str, torch.Tensor] = {}
        with contextlib.closing(self._weight_stream(dtype or self.save_dtype, None, True, False)) as stream:
            for names, tensors in stream:  # closed at once on an error: its remaining gathers run here
                out.update(zip(names, [t.clone() for t in tensors], strict=True))  # the stream may alias parameters
        return out if self.ranks.leader else None

    def save(self, out_dir: str | Path, feed: bool = False) -> Path:
        """A folder an engine can load: config (with the dtype written), tokenizer, and the weights in
        model.save_dtype as safetensors, one file a bucket of `weight_plan` (`model.safetensors` when one bucket,
        else `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, as `save_pretrained` shards),
        streamed: rank 0 holds one bucket at a time. Older weight files in the folder are removed. On several ranks
        the others join each gather and return once the folder is complete. feed: as `_weight_stream`'s (the loop's
        save for the engines)."""
        out = Path(out_dir)
        leader = self.ranks.leader
        if leader:  # before the followers are told: a folder that cannot be made fails alone
            out.mkdir(parents=True, exist_ok=True)
        self.ranks.announce("save", out_dir=str(out), feed=feed)
        n = len(self.weight_plan())
        written: dict[str, str] = {}
        total = 0
        with contextlib.closing(self._weight_stream(self.save_dtype, None, True, feed)) as stream:
            for i, (names, tensors) in enumerate(stream):  # a write that fails closes it: its gathers still run
                fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                save_file(
                    {k: t.contiguous() for k, t in zip(names, tensors, strict=True)}, out / fname, {"format": "pt"}
                )
                written.update(dict.fromkeys(names, fname))
                total += sum(t.numel() * t.element_size() for t in tensors)
        if not leader:
            return out
        index = out / "model.safetensors.index.json"
        for old in [*out.glob("*.safetensors"), index]:
            if old.exists() and old.name not in set(written.values()):
                old.unlink()
        if n > 1:
            index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": written}, indent=2))
        model = self.accelerator.unwrap_model(self.model)
        config = copy.deepcopy(model.config)  # its dtype says what the weights were written in
        config.dtype = self.save_dtype
        config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return out

    def save_state(self, path: str | Path) -> None:
        """The training state, sharded: the float32 master weights and the optimizer's state, written by every rank
        for its own shards with torch.distributed.checkpoint (no gather: nothing whole on any rank's host), into
        folder `path` (shared by the ranks). `load_state` resumes it on any number of ranks."""
        self.ranks.announce("save_state", path=str(path))
        with self.lock:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            with _one_process_dcp() as no_dist:
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path), no_dist=no_dist)

    def load_state(self, path: str | Path) -> None:
        """Restore `save_state`'s folder, written on this many ranks or another (each rank reads what its own
        shards need), into the policy's weights and optimizer."""
        self.ranks.announce("load_state", path=str(path))
        with self.lock:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            with _one_process_dcp() as no_dist:
                dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state for a checkpoint (on rank 0; {} on the followers): on several ranks the full
        state gathered to rank 0's CPU, keyed by parameter name."""
        self.ranks.announce("optimizer_state")
        with self.lock:
            if not self.ranks.many:
                return self.optimizer.state_dict()
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=opts)

    def load_optimizer_state(self, state: dict[str, Any] | None = None) -> None:
        """Restore `optimizer_state()`'s result (given on rank 0; broadcast to the others on several ranks)."""
        self.ranks.announce("load_optimizer_state")
        with self.lock:
            if not self.ranks.many:
                assert state is not None
                self.optimizer.load_state_dict(state)
                return
            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state or {}, options=opts)


@contextlib.contextmanager
def _one_process_dcp() -> Iterator[bool]:
    """Whether torch.distributed.checkpoint runs in one process with no process group (a 1-rank run): then it is
    said (`no_dist`), and torch's warning that it assumes so is not shown, since it is what we mean."""
    alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield alone


def _build_model(model_path: str | Path, dtype: torch.dtype, *, empty: bool) -> torch.nn.Module:
    """The model to train, in `dtype`. empty: a follower under FSDP, which accelerate fills from rank 0's weights
    (`fsdp_plugin`'s cpu_ram_efficient_loading): built from the config with its parameters on the meta device
    (no host memory; the non-persistent buffers, RoPE's inv_freq, stay real, as accelerate re-registers them),
    where loading the checkpoint on every rank took 4 bytes a parameter of host memory on each (197 GB for
    Qwen3-8B on 6 ranks) only for accelerate to move it to the meta device."""
    if not empty:
        return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
    config = AutoConfig.from_pretrained(str(model_path))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # init_empty_weights re-registers each parameter, which unties a tied LM head
    return model


def fsdp_plugin(mixed_precision: str) -> FullyShardedDataParallelPlugin:
    """accelerate's FSDP plugin as the trainer runs it; the rest of its settings come from the launcher's FSDP_*
    variables as accelerate reads them. Two settings are the trainer's own:
    - gradients are reduced in float32 (`reduce_dtype`): accelerate's bf16 policy reduces in bf16, the parameters'
      compute dtype, rounding every micro-batch's reduce-scatter before it is added to the float32 shard;
    - cpu_ram_efficient_loading: rank 0 alone loads the checkpoint and the followers get their shards from it
      (`_build_model` builds theirs empty)."""
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise ValueError(
            f"FSDP_VERSION={version}: the trainer shards with FSDP2 only (fsdp_version: 2, as in "
            "configs/accelerate/fsdp2.yaml)"
        )
    policy = None
    if mixed_precision in ("bf16", "fp16"):
        compute = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    return FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy=policy, cpu_ram_efficient_loading=True)


def _accelerator(cpu: bool, mixed_precision: str) -> Accelerator:
    """accelerate's Accelerator for this rank. FSDP is asked for the way accelerate reads it (`accelerate launch`
    with an FSDP config, or ACCELERATE_USE_FSDP=true and FSDP_* variables under torchrun), with the trainer's
    `fsdp_plugin`; accelerate shards only on accelerators, so on CPU ranks (gloo) its state is switched to FSDP
    here, and its own FSDP2 preparation then runs as it would on GPUs: the path the CPU tests exercise."""
    plugin = fsdp_plugin(mixed_precision) if fsdp_requested() and launched_ranks() > 1 else None
    acc = Accelerator(cpu=cpu, mixed_precision=mixed_precision, fsdp_plugin=plugin)
    if plugin is not None and acc.distributed_type == DistributedType.MULTI_CPU:
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        # And in PartialState's shared state, as AcceleratorState.__init__ leaves it on GPUs: every AcceleratorState()
        # made later (AcceleratedOptimizer's, the Accelerator's own properties) copies PartialState's fields over its
        # own, so without this the state read MULTI_CPU again once the optimizer was prepared, `no_sync` was a no-op
        # and the CPU FSDP2 run skipped the GPU's gradient-sync branches (issue 20; tests/test_distributed.py checks
        # is_fsdp2 and the model's sync flag during the update).
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return acc


class FeatureModel:
    """A frozen copy of the policy's model that computes prefix features while the policy trains.

    `hidden_at` gives the same numbers as `Policy.hidden_at` on the same weights (same module, same autocast, eval
    mode). One rank or DDP: `sync()` copies the policy's current weights in, tensor by tensor under the policy's
    lock, so a copy never sees half an update; the loop syncs it at every weight push, so it follows the weights the
    engines serve. Run `hidden_at` and `sync` on one thread (`trainer.learner.compute.infer`).

    Memory: one more copy of the weights in float32, as the policy holds them (no gradients, no optimizer state):
    a few MB for the tiny model, 4 bytes a parameter for a large one (32 GB for 8B). `TraceStep.publish` makes it
    only when `run.max_staleness >= 1`; with 0 the policy computes its own features. On a GPU it runs on a CUDA
    stream of its own, so its forwards do not queue behind the optimizer's kernels on the default stream (this
    GPU path has not been run yet).

    Under FSDP no rank holds the whole model: the copy is built empty from the config (no initialisation, no host
    copy) on rank 0's device in the engines' dtype (bf16 for Qwen3: 2 bytes a parameter), and filled bucket by
    bucket from the policy's weight stream (`Policy._weight_stream`): once when made (a collective: make it on the
    thread that runs the policy's calls, `trainer.learner.compute.compute`), then by every stream the loop feeds it
    (the hand-off to the engines), so `sync()` has nothing left to do. While a stream fills it, `hidden_at` waits.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.lock = threading.Lock()  # a stream filling the copy vs its forwards
        self.stream = torch.cuda.Stream(policy.device) if policy.device.type == "cuda" else None
        if policy.sharded:
            config = policy.accelerator.unwrap_model(policy.model).config
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=policy.save_dtype)
            for module in model.modules():  # real, uninitialised storage: the stream fills every parameter
                for name, prm in list(module.named_parameters(recurse=False)):
                    module._parameters[name] = torch.nn.Parameter(
                        torch.empty(prm.shape, dtype=prm.dtype, device=policy.device), requires_grad=False
                    )
            model.tie_weights()
            install_logprob_head(model)  # as the policy's: hidden_at's signals run inside it
            model.to(policy.device)  # the buffers (RoPE's inv_freq)
            self.model = model.eval().requires_grad_(False)
            self.params = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
            policy.feature_taps[:] = [self]  # one copy fed at a time: an older one is no longer kept current
            for _ in policy.weight_stream(to_host=False, feed=True):  # the whole first fill
                pass
        else:
            with policy.lock:
                model = copy.deepcopy(policy.accelerator.unwrap_model(policy.model))
            self.model = model.eval().requires_grad_(False)
        if self.stream is not None:  # the copy was made on the default stream
            self.stream.wait_stream(torch.cuda.default_stream(policy.device))

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    @torch.no_grad()
    def sync(self) -> None:
        """Take the policy's current weights (after an update: the version about to be pushed). Under FSDP the
        stream of the hand-off has brought them already: nothing to do."""
        if self.policy.sharded:
            return
        src = self.policy.accelerator.unwrap_model(self.policy.model)
        with self.policy.lock, self.lock, self._on_stream():
            if self.stream is not None:  # the optimizer's last kernels (default stream) come first
                self.stream.wait_stream(torch.cuda.default_stream(self.policy.device))
            self.model.load_state_dict(src.state_dict())
            if self.stream is not None:  # and the next update may not overwrite them before the copy is done
                self.stream.synchronize()

    # A weight stream's tap (under FSDP): begin, load each bucket, end. The lock is held from begin to end.
    def begin(self) -> None:
        self.lock.acquire()

    @torch.no_grad()
    def load(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        for name, t in zip(names, tensors, strict=True):
            self.params[name].copy_(t, non_blocking=False)

    def end(self) -> None:
        try:
            if self.stream is not None:  # the copies ran on the stream's thread's stream: the forwards come after
                self.stream.wait_stream(torch.cuda.current_stream(self.policy.device))
        finally:
            self.lock.release()

    @torch.no_grad()
    def hidden_at(
        self,
        seqs: Sequence[list[int]],
        positions: Sequence[list[int]],
        batch: int = 16,
        signals: tuple[int, float] | None = None,
    ) -> list[torch.Tensor]:
        """As `Policy.hidden_at`, on the copy (batched the same way)."""
        p = self.policy
        forwards = p.own_forwards(seqs, batch)
        with self.lock, self._on_stream():
            return _hidden_states(self.model, p.accelerator, p.pad_id, seqs, positions, forwards, signals, p.chunk)


def _hidden_states(
    model: torch.nn.Module,
    accelerator: Accelerator,
    pad_id: int,
    seqs: Sequence[list[int]],
    positions: Sequence[list[int]],
    forwards: Sequence[Sequence[int]],
    signals: tuple[int, float] | None = None,
    chunk: int = 1024,
) -> list[torch.Tensor]:
    """The forward behind `hidden_at`: model in eval mode, no gradient; one forward per list of `forwards` (indices
    into `seqs`, together covering each once). Returns one tensor per sequence, in `seqs`' order.

    signals = (token, temperature): each row also gets, after the hidden state, the model's log p(token next) and
    its next-token entropy there (`HeadSignals`, from the same forward: the LM head runs at the given positions
    only, `chunk` of them at a time). The model must have a `LogprobHead`."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    device = accelerator.device
    for fw in forwards:
        rows = [seqs[i] for i in fw]
        ids = pad_rows(rows, pad_id, torch.long, device)
        att = pad_rows([[1] * len(s) for s in rows], 0, torch.long, device)
        head = None if signals is None else HeadSignals([list(positions[i]) for i in fw], *signals, chunk, device)
        with accelerator.autocast(), head.active() if head is not None else contextlib.nullcontext():
            # logits_to_keep=1: the LM head runs on one position per row, not the whole batch's full-vocabulary
            # logits (tens of GB for a Qwen3-8B batch); with signals, at the rows' positions only, inside the head.
            # The last hidden state is taken from the final norm's output (a hook) rather than
            # `output_hidden_states`, which keeps every layer's; and no KV cache is built.
            keep = 1 if head is None else head.keep
            h, logits = _last_hidden(model, input_ids=ids, attention_mask=att, logits_to_keep=keep, use_cache=False)
        sig = head.rows(logits) if head is not None else None
        for j, i in enumerate(fw):
            row = h[j, torch.tensor(positions[i], device=h.device)].float()
            if sig is not None:
                row = torch.cat([row, sig[j].float()], dim=1)
            out[i] = row.cpu()
    assert all(h is not None for h in out), "the forwards cover every sequence"
    return out  # type: ignore[return-value]


def _last_hidden(model: torch.nn.Module, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's last hidden state (after the final norm, as `hidden_states[-1]`) for `inputs`, and the output's
    `logits`: the hidden state captured from the decoder's final norm by a forward hook, so no other layer's output
    is kept. Models without a `norm` on their decoder fall back to `output_hidden_states`."""
    unwrapped = getattr(model, "module", model)  # DDP's wrapper (rank 0's own forwards use the module itself)
    norm = getattr(unwrapped.get_decoder(), "norm", None) if hasattr(unwrapped, "get_decoder") else None
    if norm is None:
        res = model(**inputs, output_hidden_states=True)
        return res.hidden_states[-1], res.logits
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        res = model(**inputs)
    finally:
        handle.remove()
    assert len(seen) == 1, f"the final norm ran {len(seen)} times in one forward"
    return seen[0], res.logits

"""The policy being trained: model + optimizer prepared by accelerate, and the three things the loop
asks of it — prefix features for the predictor, an RL update on tree samples, an SFT update — plus
weight export for the engine.

accelerate owns device placement, mixed precision, DDP/FSDP and gradient accumulation, so the same
code runs on a laptop CPU (fp32) and under `accelerate launch` on GPUs (bf16). Gradients are
accumulated over the whole step's samples (micro-batches of `micro_batch_size` sequences) and the
loss of each micro-batch is scaled by its share of the step's weighted tokens, so one optimizer
step sees the token-mean loss over everything sampled, whatever the batching.

A `threading.Lock` guards the weights: the update, saves and `hidden_at` hold it, and so does `FeatureModel.sync`,
which copies the weights into the frozen copy that computes the next step's rollout features on a thread of its
own while this step trains (`run.max_staleness >= 1`, `trainer.compute`), so no one sees half-updated weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from trainer.advantages import TrainSample
from trainer.config import ModelConfig, OptimConfig
from trainer.loss import policy_loss, sequence_logprobs

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


def _pad(seqs: Sequence[Sequence[Any]], value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=dtype)
    return out.to(device)


class Policy:
    def __init__(
        self,
        model_path: str | Path,
        mcfg: ModelConfig,
        ocfg: OptimConfig,
        *,
        seed: int = 0,
        temperature: float = 1.0,
        reference: str | Path | None = None,
    ) -> None:
        """reference: the model (folder or hub id) of the frozen KL reference (optim.kl_coef > 0), default
        `model_path`. A resumed run passes the weights it started from, so the KL term keeps pulling towards them
        and not towards the checkpoint. `self.reference` records it (a local folder as an absolute path)."""
        cpu = mcfg.device == "cpu" or (mcfg.device == "auto" and not torch.cuda.is_available())
        mp = mcfg.mixed_precision
        if mp == "auto":
            mp = "no" if cpu else "bf16"
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mp)
        torch.manual_seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
        self.save_dtype = save_dtype(mcfg.save_dtype, model_path)
        if mcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.ocfg = ocfg
        opt = torch.optim.AdamW(model.parameters(), lr=ocfg.lr, weight_decay=ocfg.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, opt)
        self.lock = threading.Lock()
        # The weight version: RL updates pushed to the engines so far (0 = the starting weights). The loop advances
        # it with each push; samples are judged stale against it (trainer.staleness).
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
                ref = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float32).to(self.device)
            if mp == "bf16":  # it only runs forward under autocast: half the memory of an fp32 copy
                ref = ref.to(torch.bfloat16)
            self.ref_model = ref.eval().requires_grad_(False)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    # ------------------------------------------------------------------ predictor features
    @torch.no_grad()
    def hidden_at(
        self, seqs: Sequence[list[int]], positions: Sequence[list[int]], batch: int = 16
    ) -> list[torch.Tensor]:
        """Last-layer hidden state at each given position of each sequence: one [len(pos_i), H] float32
        tensor per sequence (CPU). One forward per sequence, batched; no gradient."""
        with self.lock:
            self.model.eval()
            try:
                return _hidden_states(self.model, self.accelerator, self.pad_id, seqs, positions, batch)
            finally:
                self.model.train()

    # ------------------------------------------------------------------ RL update
    def rl_update(self, samples: Sequence[TrainSample]) -> dict[str, float]:
        """One optimizer step per PPO epoch over all samples; returns averaged loss metrics."""
        if not samples:
            return {"loss": 0.0, "trained_tokens": 0.0}
        samples = sorted(samples, key=lambda s: len(s.input_ids))  # micro-batches of similar length pad less
        # Per-sample factor on the token weights: 1 (token-mean) or 1 / the sample's trained tokens (seq-mean).
        seq = self.ocfg.loss_agg == "seq-mean-token-mean"
        scale = [1.0 / max(1, sum(s.loss_mask)) if seq else 1.0 for s in samples]
        total_w = sum(sum(s.weights) * c for s, c in zip(samples, scale, strict=True))
        assert total_w > 0, f"{len(samples)} samples carry no weighted tokens"
        mb = self.ocfg.micro_batch_size
        agg: dict[str, float] = {}
        with self.lock:
            self.model.train()
            old: list[torch.Tensor | None] = [None] * len(samples)
            for epoch in range(self.ocfg.ppo_epochs):
                self.optimizer.zero_grad(set_to_none=True)
                for i in range(0, len(samples), mb):
                    chunk = samples[i : i + mb]
                    ids = _pad([s.input_ids for s in chunk], self.pad_id, torch.long, self.device)
                    att = _pad([[1] * len(s) for s in chunk], 0, torch.long, self.device)
                    # sequence_logprobs()[b, t] is the logprob of token t, so per-token tensors align as they are.
                    mask = _pad([s.loss_mask for s in chunk], 0, torch.float32, self.device)
                    adv = _pad([s.advantages for s in chunk], 0.0, torch.float32, self.device)
                    w = _pad([s.weights for s in chunk], 0.0, torch.float32, self.device)
                    w = w * torch.tensor(scale[i : i + mb], dtype=torch.float32, device=self.device)[:, None]
                    eng = _pad([s.engine_logprobs for s in chunk], 0.0, torch.float32, self.device)
                    with self.accelerator.autocast():
                        logp = sequence_logprobs(self.model, ids, att, temperature=self.temperature, needed=mask)
                    logp = logp.float()
                    if epoch == 0:
                        for j in range(len(chunk)):
                            old[i + j] = logp[j].detach()
                    old_lp = torch.stack([old[i + j] for j in range(len(chunk))])  # type: ignore[misc]
                    ref_lp = None
                    if self.ref_model is not None:
                        with torch.no_grad(), self.accelerator.autocast():
                            ref_lp = sequence_logprobs(
                                self.ref_model, ids, att, temperature=self.temperature, needed=mask
                            ).float()
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
                    self.accelerator.backward(loss * share)
                    for k, v in m.items():
                        agg[k] = agg.get(k, 0.0) + float(v) * share / self.ocfg.ppo_epochs
                    agg["loss"] = agg.get("loss", 0.0) + float(loss.detach()) * share / self.ocfg.ppo_epochs
                gn = self.accelerator.clip_grad_norm_(self.model.parameters(), self.ocfg.grad_clip)
                agg["grad_norm"] = float(gn) if gn is not None and math.isfinite(float(gn)) else float("nan")
                self.optimizer.step()
        agg["trained_tokens"] = float(sum(sum(s.loss_mask) for s in samples))
        return agg

    # ------------------------------------------------------------------ SFT
    def sft_update(
        self, input_ids: Sequence[list[int]], loss_mask: Sequence[list[float]], micro_batch_size: int | None = None
    ) -> float:
        """One optimizer step of next-token cross-entropy, the mean over the batch's tokens weighted by
        `loss_mask` (1 = trained, 0 = not, or a weight in between); returns the loss. The batch is cut into
        micro-batches of similar length (sorted; `micro_batch_size` sequences each, default
        optim.micro_batch_size) so little is padding, and logits are computed only where a token is trained: the
        same gradient as one padded batch, at about half the cost on the tiny demo."""
        total = sum(sum(m) for m in loss_mask)
        order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
        mb = micro_batch_size or self.ocfg.micro_batch_size
        loss_sum = 0.0
        with self.lock:
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            for i in range(0, len(order), mb):
                part = order[i : i + mb]
                ids = _pad([input_ids[j] for j in part], self.pad_id, torch.long, self.device)
                att = _pad([[1] * len(input_ids[j]) for j in part], 0, torch.long, self.device)
                mask = _pad([loss_mask[j] for j in part], 0, torch.float32, self.device)
                with self.accelerator.autocast():
                    logp = sequence_logprobs(self.model, ids, att, needed=mask)
                loss = -(logp.float() * mask).sum() / max(total, 1)
                self.accelerator.backward(loss)
                loss_sum += float(loss.detach())
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.ocfg.grad_clip)
            self.optimizer.step()
        return loss_sum

    # ------------------------------------------------------------------ weights
    def save(self, out_dir: str | Path) -> Path:
        """save_pretrained (safetensors) + tokenizer: a folder an engine can load."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with self.lock:
            model = self.accelerator.unwrap_model(self.model)
            if self.accelerator.is_main_process:
                if self.save_dtype != next(model.parameters()).dtype:  # a copy in the engines' dtype; the master stays
                    model = copy.deepcopy(model).to(self.save_dtype)
                model.save_pretrained(out, safe_serialization=True)
                self.tokenizer.save_pretrained(out)
            self.accelerator.wait_for_everyone()  # after the write: no rank returns before the folder is complete
        return out

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


class FeatureModel:
    """A frozen copy of the policy's model that computes prefix features while the policy trains.

    `hidden_at` gives the same numbers as `Policy.hidden_at` on the same weights (same module, same autocast, eval
    mode); `sync()` copies the policy's current weights in, tensor by tensor under the policy's lock, so a copy
    never sees half an update. Between syncs it keeps the weights of the last one: the loop syncs it at every
    weight push, so it follows the weights the engines serve. Run both on one thread (`trainer.compute.infer`).

    Memory: one more copy of the weights in float32, as the policy holds them (no gradients, no optimizer state):
    a few MB for the tiny model, 4 bytes a parameter for a large one (32 GB for 8B). `TraceStep.publish` makes it
    only when `run.max_staleness >= 1`; with 0 the policy computes its own features. On a GPU it runs on a CUDA
    stream of its own, so its forwards do not queue behind the optimizer's kernels on the default stream (this
    GPU path has not been run yet). Under FSDP the copy would need the full state dict: not supported.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        with policy.lock:
            self.model = copy.deepcopy(policy.accelerator.unwrap_model(policy.model)).eval().requires_grad_(False)
        self.stream = torch.cuda.Stream(policy.device) if policy.device.type == "cuda" else None
        if self.stream is not None:  # the copy was made on the default stream
            self.stream.wait_stream(torch.cuda.default_stream(policy.device))

    def _on_stream(self) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    @torch.no_grad()
    def sync(self) -> None:
        """Take the policy's current weights (after an update: the version about to be pushed)."""
        src = self.policy.accelerator.unwrap_model(self.policy.model)
        with self.policy.lock, self._on_stream():
            if self.stream is not None:  # the optimizer's last kernels (default stream) come first
                self.stream.wait_stream(torch.cuda.default_stream(self.policy.device))
            self.model.load_state_dict(src.state_dict())
            if self.stream is not None:  # and the next update may not overwrite them before the copy is done
                self.stream.synchronize()

    @torch.no_grad()
    def hidden_at(
        self, seqs: Sequence[list[int]], positions: Sequence[list[int]], batch: int = 16
    ) -> list[torch.Tensor]:
        """As `Policy.hidden_at`, on the copy."""
        p = self.policy
        with self._on_stream():
            return _hidden_states(self.model, p.accelerator, p.pad_id, seqs, positions, batch)


def _hidden_states(
    model: torch.nn.Module,
    accelerator: Accelerator,
    pad_id: int,
    seqs: Sequence[list[int]],
    positions: Sequence[list[int]],
    batch: int,
) -> list[torch.Tensor]:
    """The forward behind `hidden_at`: model in eval mode, no gradient."""
    out: list[torch.Tensor] = []
    device = accelerator.device
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        ids = _pad(chunk, pad_id, torch.long, device)
        att = _pad([[1] * len(s) for s in chunk], 0, torch.long, device)
        with accelerator.autocast():
            # logits_to_keep=1: the LM head runs on one position per row, not the whole batch's full-vocabulary
            # logits (tens of GB for a Qwen3-8B batch); the hidden states are the same either way.
            h = model(input_ids=ids, attention_mask=att, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        for j, pos in enumerate(positions[i : i + batch]):
            out.append(h[j, torch.tensor(pos, device=h.device)].float().cpu())
    return out

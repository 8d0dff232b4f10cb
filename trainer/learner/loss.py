"""Token-level policy loss (PPO-clip with truncated importance sampling) and per-token logprobs.

Alignment convention, used by every per-token tensor here and in `trainer.learner.samples.TrainSample`: position t
holds the quantity *of token input_ids[t]* (its logprob given input_ids[:t], its advantage, its weight, its
loss mask). `sequence_logprobs` returns [B, T] in that layout, with 0.0 at t = 0 (no context predicts the first
token) and at padding. Batches are right-padded (the model derives position ids 0..T-1); one row holds one
sequence (no packing).

Which logprobs go where:
- `logp`: the policy being trained, with grad (`sequence_logprobs` on the current weights);
- `old_logp`: the trainer's logprobs of the weights that generated the rollout (PPO's pi_old), recomputed by
  the trainer; equal to `logp.detach()` on the first minibatch of a fully on-policy step. A trainer that skips
  the recomputation may pass the engine's logprobs here: the ratio is then taken against the engine and the
  TIS weight is 1;
- `engine_logp`: the engine's sampling logprobs (SGLang `output_token_logprobs`), from `TrainSample`.
The engine and the trainer compute the same distribution with different kernels and precision, so
pi_old != pi_engine; the truncated importance sampling weight min(pi_old / pi_engine, tis_cap), detached,
corrects the policy gradient for sampling from pi_engine (Yao et al., 2025, "Your efficient RL framework
secretly brings you off-policy RL training"). It multiplies the PPO term only, not the KL term.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# log-ratios are clamped to +-LOG_RATIO_CLAMP before exp, so that a broken token (e.g. a padding id the engine
# never sampled) yields a large but finite ratio instead of inf * 0 = nan.
LOG_RATIO_CLAMP = 20.0


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    engine_logp: Tensor,
    advantages: Tensor,
    weights: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    tis_cap: float | None = 2.0,
    kl_coef: float = 0.0,
    ref_logp: Tensor | None = None,
    denom: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip loss, token-mean over the weighted trained tokens: sum(w * m * l) / sum(w * m) with
    l = TIS * max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_eps_high)) + kl_coef * k3(ref || pi).

    All inputs are [B, T] (or any equal shape). clip_eps_high defaults to clip_eps (set it higher for DAPO's
    clip-higher). tis_cap=None disables TIS. k3(ref || pi) = exp(ref - logp) - (ref - logp) - 1 (Schulman's
    unbiased, non-negative estimator). Returns (loss, metrics): clip_frac (share of trained tokens whose
    clipped term is active), tis_mean, tis_clip_frac (share where pi_old / pi_engine > tis_cap), approx_kl
    (k3 between pi_old and pi), logprob_diff (mean |old_logp - engine_logp|), kl_ref (when ref_logp is given),
    tokens (the summed weight). With no trained token the loss is a zero that still has a graph.

    denom: the summed weight of trained tokens over the whole optimiser step (all micro-batches of gradient
    accumulation, all ranks), so that the step's gradient is one token mean rather than a mean of per-batch
    means; default: this call's own sum(w * m). Metrics always use this call's own sum."""
    shape = logp.shape
    for name, x in (
        ("old_logp", old_logp),
        ("engine_logp", engine_logp),
        ("advantages", advantages),
        ("weights", weights),
        ("mask", mask),
    ):
        assert x.shape == shape, f"{name} has shape {tuple(x.shape)}, logp has {tuple(shape)}"
    assert clip_eps >= 0 and (tis_cap is None or tis_cap > 0), f"clip_eps={clip_eps} tis_cap={tis_cap}"
    on = mask.bool() & (weights > 0)
    w = torch.where(on, weights.to(logp.dtype), torch.zeros_like(logp))
    w_sum = w.sum()
    zero = torch.zeros_like(logp)
    old = old_logp.detach().to(logp.dtype)
    adv = torch.where(on, advantages.to(logp.dtype), zero)

    log_ratio = torch.where(on, logp - old, zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + hi)
    pg = torch.maximum(pg_unclipped, pg_clipped)

    with torch.no_grad():
        log_tis = torch.where(on, old - engine_logp.to(logp.dtype), zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        raw_tis = torch.exp(log_tis)
        tis = raw_tis if tis_cap is None else raw_tis.clamp(max=tis_cap)
    per_token = tis * pg

    kl_ref = None
    if kl_coef != 0.0 or ref_logp is not None:
        assert ref_logp is not None, "kl_coef != 0 needs ref_logp"
        assert ref_logp.shape == shape, f"ref_logp has shape {tuple(ref_logp.shape)}, logp has {tuple(shape)}"
        d = torch.where(on, ref_logp.detach().to(logp.dtype) - logp, zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl_ref = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * kl_ref

    own = w_sum.clamp_min(1e-12)  # this call's token-mean denominator
    if denom is not None:
        assert float(denom) > 0, f"denom={denom}"
        loss = (per_token * w).sum() / denom
    else:
        loss = (per_token * w).sum() / own

    with torch.no_grad():
        stats = [
            ((pg_clipped > pg_unclipped).to(w.dtype) * w).sum() / own,
            (tis * w).sum() / own,
            ((raw_tis > tis_cap).to(w.dtype) * w).sum() / own if tis_cap is not None else zero.sum(),
            (((ratio - 1.0) - log_ratio) * w).sum() / own,
            ((old - engine_logp.to(logp.dtype)).abs() * w).sum() / own,
            (kl_ref.detach() * w).sum() / own if kl_ref is not None else zero.sum(),
            w_sum,
        ]
        values = torch.stack([s.float() for s in stats]).tolist()
    names = ["clip_frac", "tis_mean", "tis_clip_frac", "approx_kl", "logprob_diff", "kl_ref", "tokens"]
    metrics = dict(zip(names, values, strict=True))
    if kl_ref is None:
        del metrics["kl_ref"]
    return loss, metrics


LOGPROB_CHUNK = 1024
"""Default positions a chunk of `LogprobHead`: the most rows whose full-vocabulary logits exist at once."""


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    temperature: float = 1.0,
    needed: Tensor | None = None,
    chunk: int = LOGPROB_CHUNK,
) -> Tensor:
    """out[b, t] = log p(input_ids[b, t] | input_ids[b, :t]) under `model` (logits / temperature), for t >= 1;
    0.0 at t = 0 and at padding. [B, T] float32 (float64 for a float64 model), with grad when the model has it. Rows
    must be right-padded.

    needed: optional [B, T] mask of the tokens whose logprob the caller uses (the loss mask). The model's last hidden
    state goes to the vocabulary projection only at the positions some row needs (`logits_to_keep`, the union over
    rows), and out is 0.0 at the other positions: the same values where needed, at a fraction of the cost when the
    trained tokens are a small share of the sequence (agent turns between long observations).

    With a `LogprobHead` installed (`install_logprob_head`; the trainer's policy has one) the [positions x
    vocabulary] logits are never formed whole: the head computes each needed (row, position)'s logprob in chunks of
    `chunk` positions and recomputes the chunk's logits in backward (`token_logprobs`), so what a micro-batch holds
    for backward is its last hidden state at the needed positions plus one float a position, and the transient is
    one chunk's logits. Without one (any other model) the logits are computed whole and each row's log-softmax
    taken in turn: the reference the chunked path is tested against (tests/test_loss.py)."""
    assert input_ids.shape == attention_mask.shape and input_ids.ndim == 2, (
        f"input_ids {tuple(input_ids.shape)} vs attention_mask {tuple(attention_mask.shape)}"
    )
    assert temperature > 0, f"temperature={temperature}"
    am = attention_mask.long()
    assert (am[:, 1:] <= am[:, :-1]).all(), "attention_mask is not right-padded (a 0 precedes a 1 in some row)"
    B, T = input_ids.shape
    # The model gets no attention mask: with causal attention and right padding, a real token never sees the
    # padding after it, and position ids are 0..T-1 either way; without a mask the attention kernel takes its
    # causal fast path (~15% faster a step on the tiny model). Padding positions are zeroed below.
    if needed is not None:
        assert needed.shape == input_ids.shape, f"needed {tuple(needed.shape)} vs input_ids {tuple(input_ids.shape)}"
    base = getattr(model, "module", model)  # DDP's wrapper
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if isinstance(head, LogprobHead):
        return _head_logprobs(model, input_ids, am, temperature, needed, chunk)
    if needed is not None and T >= 2:
        # Position p's logits predict token p + 1: keep p where any row needs token p + 1 (at least one, so the
        # output keeps a graph even when nothing is needed).
        keep = (needed[:, 1:].bool() & am[:, 1:].bool()).any(0).nonzero().squeeze(-1)
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        logits = model(input_ids=input_ids, logits_to_keep=keep, use_cache=False).logits  # [B, K, V]
        targets = input_ids[:, keep + 1]
        cols = keep + 1
    else:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]  # [B, T-1, V]
        targets = input_ids[:, 1:]
        cols = None
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 (bf16 logits upcast), or float64
    rows = []
    for b in range(B):
        lg = logits[b].to(dtype)
        if temperature != 1.0:
            lg = lg / temperature
        rows.append(lg.gather(-1, targets[b].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    lp = torch.stack(rows) if rows else logits.new_zeros(0, logits.shape[1], dtype=dtype)
    if cols is None:
        lp = torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)
    else:
        full = lp.new_zeros(B, T)
        lp = full.index_copy(1, cols, lp)
    out = lp * am.to(lp.dtype)
    return out if needed is None else out * needed.bool().to(out.dtype)


def _head_logprobs(
    model: nn.Module, input_ids: Tensor, am: Tensor, temperature: float, needed: Tensor | None, chunk: int
) -> Tensor:
    """`sequence_logprobs` through the model's `LogprobHead`: the head returns [B, K] logprobs as the output's
    `logits`, computed at the (row, kept position) pairs whose next token is needed and real."""
    B, T = input_ids.shape
    want = am[:, 1:].bool() if needed is None else needed[:, 1:].bool() & am[:, 1:].bool()  # [B, T-1]
    keep = want.any(0).nonzero().squeeze(-1) if T >= 2 else want.new_zeros(0, dtype=torch.long)
    if keep.numel() == 0:  # nothing needed: one position, no pair computed, so the output still has a graph
        keep = torch.zeros(1, dtype=torch.long, device=input_ids.device)
        pairs = torch.zeros(B, 1, dtype=torch.bool, device=input_ids.device)
        targets = input_ids[:, :1]
    else:
        pairs, targets = want[:, keep], input_ids[:, keep + 1]
    with _head_request(_HeadRequest(targets, pairs, temperature, chunk)):
        lp = model(input_ids=input_ids, logits_to_keep=keep, use_cache=False).logits  # [B, K]
    assert lp.shape == (B, keep.numel()), f"the LogprobHead returned {tuple(lp.shape)}, not [B, K]"
    out = lp.new_zeros(B, T).index_copy(1, keep + 1, lp) if T >= 2 else lp.new_zeros(B, T) + 0 * lp.sum()
    return out


# ---------------------------------------------------------------------------------------------- the chunked head
@dataclass
class _HeadRequest:
    targets: Tensor  # [B, K] token ids whose logprob is wanted at each kept position
    pairs: Tensor  # [B, K] bool: which (row, position) to compute (the others are 0.0)
    temperature: float
    chunk: int
    index: Tensor | None = None
    """[B, K] positions in each row of the head's input: the (b, k) pair reads row b's hidden state at index[b, k]
    (a position may be read more than once: a parent with several children, `trainer.learner.packing`). None: the
    head's input is already [B, K]."""


@dataclass
class _SignalRequest:
    token: int  # the token whose log-probability is wanted (the answer tag's)
    pairs: Tensor  # [B, K] bool: which (row, kept position) to compute (the others are 0.0)
    temperature: float
    chunk: int


_REQUEST = threading.local()


@contextlib.contextmanager
def _head_request(req: _HeadRequest | _SignalRequest) -> Iterator[None]:
    """While active on this thread, a `LogprobHead`'s forward returns logprobs for `req` instead of logits."""
    prev = getattr(_REQUEST, "value", None)
    _REQUEST.value = req
    try:
        yield
    finally:
        _REQUEST.value = prev


class LogprobHead(nn.Linear):
    """The model's LM head (a bias-free `nn.Linear`, the same parameter: tied weights stay tied), which, inside
    `sequence_logprobs`, returns the logprobs of given tokens instead of the logits: [B, K] from hidden [B, K, H],
    through `token_logprobs`. Any other call (generation, `logits_to_keep=1` feature forwards) gets the logits, as
    from the Linear it replaced. The logprobs are computed inside the head's own forward so that under FSDP2 they
    run where the head's weight is gathered, and its gradient reaches the weight as a Linear's would."""

    def forward(self, hidden: Tensor) -> Tensor:  # type: ignore[override]
        req: _HeadRequest | _SignalRequest | None = getattr(_REQUEST, "value", None)
        if req is None:
            return super().forward(hidden)
        if isinstance(req, _SignalRequest):
            where = req.pairs.nonzero(as_tuple=True)
            sig = next_token_signals(hidden[where], self.weight, req.token, req.temperature, req.chunk)
            return sig.new_zeros(*req.pairs.shape, 2).index_put(where, sig)
        if req.index is not None:
            hidden = hidden.gather(1, req.index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return token_logprobs(hidden, self.weight, req.targets, req.pairs, req.temperature, req.chunk)


def install_logprob_head(model: nn.Module) -> None:
    """Make `model`'s output embedding (a bias-free nn.Linear, as in Qwen3ForCausalLM) a `LogprobHead`, in place
    (before accelerate prepares the model: FSDP2 then wraps this class). Idempotent."""
    head = model.get_output_embeddings()
    if isinstance(head, LogprobHead):
        return
    if type(head) is not nn.Linear or head.bias is not None:
        raise TypeError(f"the LM head is {type(head).__name__} (bias {head.bias is not None}): a bias-free nn.Linear")
    head.__class__ = LogprobHead


def token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, pairs: Tensor, temperature: float = 1.0, chunk: int = 1024
) -> Tensor:
    """log softmax(hidden @ weight.T / temperature)[targets] at the (b, k) where `pairs` is true, 0.0 elsewhere:
    [B, K] float32 (float64 for float64 inputs) from hidden [B, K, H], weight [V, H], targets [B, K].

    The matrix products run in the compute dtype (autocast's when it is on, as a Linear under autocast; else the
    weight's) and each chunk's logits are upcast before the log-softmax, as the unchunked path does. Only `chunk`
    rows of logits exist at a time, in forward and in backward, which recomputes them (the weight's gradient is
    summed over chunks in float32 at least)."""
    assert chunk >= 1, f"chunk={chunk}"
    dev = hidden.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    where = pairs.nonzero(as_tuple=True)
    h = hidden[where].to(compute)
    w = weight.to(compute)
    with torch.autocast(dev, enabled=False):
        lp = _TokenLogprobs.apply(h, w, targets[where], float(temperature), int(chunk))
    out = lp.new_zeros(pairs.shape)
    return out.index_put(where, lp)


@torch.no_grad()
def next_token_signals(
    hidden: Tensor, weight: Tensor, token: int, temperature: float = 1.0, chunk: int = 1024
) -> Tensor:
    """[N, 2] float32 (float64 for float64 inputs): log p(token) and the entropy (nats) of the next-token
    distribution softmax(hidden @ weight.T / temperature), for hidden [N, H] and weight [V, H]. `chunk` rows of
    logits at a time, no gradient: the predictor's gold-free signals at a prefix end (`predictor.policy_signals`)."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    out = hidden.new_empty(hidden.shape[0], 2, dtype=acc)
    dev = hidden.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    w = weight.to(compute)
    with torch.autocast(dev, enabled=False):
        for s in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[s : s + chunk].to(compute), w, acc, temperature)
            logp = torch.log_softmax(logits, dim=-1)
            out[s : s + chunk, 0] = logp[:, token]
            out[s : s + chunk, 1] = -(logp.exp() * logp).sum(-1)
            del logits, logp
    return out


class HeadSignals:
    """`next_token_signals` at given positions of each row of one forward, computed inside the model's
    `LogprobHead` (so under FSDP2 where its weight is gathered). Pass `keep` as the forward's `logits_to_keep` (the
    union of the rows' positions: the head sees the last hidden state there only) and run the forward inside
    `active()`; the output's `logits` is then [B, K, 2], and `rows` turns it into one [len(positions[b]), 2] tensor
    a row."""

    def __init__(
        self, positions: list[list[int]], token: int, temperature: float, chunk: int, device: torch.device
    ) -> None:
        self.positions = positions
        keep = sorted({p for ps in positions for p in ps}) or [0]
        self.col = {p: j for j, p in enumerate(keep)}
        self.keep = torch.tensor(keep, dtype=torch.long, device=device)
        pairs = torch.zeros(len(positions), len(keep), dtype=torch.bool, device=device)
        for b, ps in enumerate(positions):
            pairs[b, [self.col[p] for p in ps]] = True
        self.request = _SignalRequest(token, pairs, temperature, chunk)

    def active(self) -> contextlib.AbstractContextManager[None]:
        return _head_request(self.request)

    def rows(self, sig: Tensor) -> list[Tensor]:
        want = (len(self.positions), self.keep.numel(), 2)
        assert tuple(sig.shape) == want, f"the LogprobHead returned {tuple(sig.shape)}, not {want}"
        return [sig[b, [self.col[p] for p in ps]] for b, ps in enumerate(self.positions)]


class _TokenLogprobs(torch.autograd.Function):
    """[N] logprobs of targets [N] under logits = h [N, H] @ w[V, H].T / temperature, chunk rows at a time; saves
    h, w, the targets and each row's log-sum-exp, and recomputes the logits in backward."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, temperature: float, chunk: int) -> Tensor:  # type: ignore[override]
        acc = torch.promote_types(h.dtype, torch.float32)
        n = h.shape[0]
        lp = h.new_empty(n, dtype=acc)
        lse = h.new_empty(n, dtype=acc)
        for s in range(0, n, chunk):
            logits = _chunk_logits(h[s : s + chunk], w, acc, temperature)
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            lp[s : s + chunk] = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
            del logits
        ctx.save_for_backward(h, w, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return lp

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        h, w, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        acc = lse.dtype
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], ctx.chunk):
                e = s + ctx.chunk
                g = grad[s:e].to(acc)
                # d lp / d logits = onehot(target) - softmax(logits); times the incoming gradient, / temperature
                gl = (_chunk_logits(h[s:e], w, acc, ctx.temperature) - lse[s:e, None]).exp_().mul_(-g[:, None])
                gl.scatter_add_(1, targets[s:e, None], g[:, None])
                if ctx.temperature != 1.0:
                    gl.div_(ctx.temperature)
                gl = gl.to(h.dtype)
                if grad_h is not None:
                    grad_h[s:e] = gl @ w
                if grad_w is not None:
                    grad_w += (gl.T @ h[s:e]).to(acc)
                del gl
        return grad_h, None if grad_w is None else grad_w.to(w.dtype), None, None, None


def _chunk_logits(h: Tensor, w: Tensor, acc: torch.dtype, temperature: float) -> Tensor:
    logits = (h @ w.T).to(acc)
    return logits.div_(temperature) if temperature != 1.0 else logits

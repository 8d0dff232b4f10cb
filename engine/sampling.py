"""Token sampling with SGLang's semantics, checked against SGLang 0.5.x `srt/layers/sampler.py` and
`srt/sampling/sampling_params.py`. A pure function of the logits, the parameters and the generator.

- temperature < 1e-6 (`SAMPLING_EPS`) means greedy: SGLang rewrites it to temperature 1, top_k 1; the token is the
  argmax.
- Otherwise logits are divided by the temperature, softmaxed, then filtered top-k first, renormalised, top-p
  (smallest set whose mass reaches top_p), then min-p relative to the top token (flashinfer's default order,
  `top_k_top_p_sampling_from_probs(filter_apply_order="top_k_first")` / `top_k_renorm_prob` + `top_p_renorm_prob`
  + `min_p_sampling_from_probs`); the token is drawn from what is left.
- The returned logprob (`output_token_logprobs`) is SGLang's default (`SGLANG_RETURN_ORIGINAL_LOGPROB` unset):
  `log_softmax(logits / temperature)` at the sampled token, i.e. the temperature-scaled distribution BEFORE
  top-k/top-p/min-p truncation (`logprobs = torch.log(probs)` on the scaled softmax), and plain
  `log_softmax(logits)` for greedy requests. `original_logprob=True` (`EngineConfig.return_original_logprob`)
  mirrors the env flag: always the untempered `log_softmax(logits)`. (SGLang's all-greedy batch path also uses the
  raw distribution, so a greedy request's logprob is the same whatever it is batched with; so it is here.)
- Top logprobs (`top_logprobs_num` > 0, SGLang's `output_top_logprobs`) come from that same distribution: the n
  largest entries of the row's logprobs, largest first (`torch.topk`), as (logprob, token_id) pairs.

Request validation (the ranges of these parameters) is `engine.Engine.validate`'s; finish checks are the scheduler's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from shared.engine_protocol import SamplingParams

# SGLang's _SAMPLING_EPS: a temperature below it is greedy.
SAMPLING_EPS = 1e-6


class Sampled(NamedTuple):
    """One sampling step's answer, a row per request: the token, its logprob, and its top logprobs (a list of
    (logprob, token_id), largest first; None for a row that asked for none)."""

    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[float, int]] | None]


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generator: torch.Generator,
    *,
    original_logprob: bool = False,
    top_n: Sequence[int] | None = None,
) -> Sampled:
    """Sample one token per row of `logits` [B, V] with SGLang's semantics; `top_n[i]` top logprobs for row i.

    See the module docstring for the exact order of the filters and which distribution the logprobs are from.
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
    top: list[list[tuple[float, int]] | None] = [None] * bsz
    want = list(top_n) if top_n is not None else [0] * bsz
    assert len(want) == bsz and all(0 <= n <= vocab for n in want), f"top_n={want} for {bsz} rows of {vocab}"
    if max(want, default=0) > 0:
        vals, idx = logp.topk(max(want), dim=-1)
        for r, n in enumerate(want):
            if n:
                top[r] = list(zip(vals[r, :n].tolist(), idx[r, :n].tolist(), strict=True))
    return Sampled(tokens.tolist(), lps.tolist(), top)

"""Policy loss on hand-set tensors, and sequence_logprobs / one optimiser step on a tiny random Qwen3."""

import copy
import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from trainer.learner.config import ModelConfig, OptimConfig
from trainer.learner.loss import LogprobHead, install_logprob_head, policy_loss, sequence_logprobs
from trainer.learner.policy import Policy
from trainer.learner.samples import TrainSample


@pytest.fixture(scope="module")
def tiny_config():
    return Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )


def tiny_model(config, seed=0):
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).float()


def ones(*shape):
    return torch.ones(*shape)


def test_on_policy_loss_is_minus_weighted_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 4.0, 9.0]])
    w = torch.tensor([[1.0, 0.5, 0.5, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = policy_loss(logp, logp.detach(), logp.detach(), adv, w, mask)
    # ratio 1, TIS 1: loss = -(1*1 + 0.5*-2 + 0.5*4) / 2 = -1
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-0.5, 0.5, -1.0, 0.0])  # -A w / sum(w); masked: 0
    assert m["clip_frac"] == 0 and m["tis_mean"] == pytest.approx(1.0) and m["tokens"] == pytest.approx(2.0)
    assert m["approx_kl"] == pytest.approx(0.0) and m["logprob_diff"] == 0.0 and "kl_ref" not in m


def test_clipping_and_tis():
    # token 0: A > 0, ratio 1.5 > 1.2: clipped, no gradient. token 1: A < 0, ratio 1.5: unclipped (pessimistic).
    old = torch.tensor([[0.0, 0.0]]) + math.log(1 / 1.5)
    logp = torch.zeros(1, 2, requires_grad=True)
    engine = old - math.log(3.0)  # pi_old / pi_engine = 3 -> TIS capped at 2
    adv = torch.tensor([[1.0, -1.0]])
    loss, m = policy_loss(logp, old, engine, adv, ones(1, 2), ones(1, 2), clip_eps=0.2, tis_cap=2.0)
    assert loss.item() == pytest.approx(2.0 * (-1.2 + 1.5) / 2)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([0.0, 2.0 * 1.5 / 2])
    assert m["clip_frac"] == 0.5 and m["tis_mean"] == pytest.approx(2.0) and m["tis_clip_frac"] == 1.0
    assert m["logprob_diff"] == pytest.approx(math.log(3.0))
    assert m["approx_kl"] == pytest.approx(0.5 - math.log(1.5))
    # clip-higher admits the ratio 1.5 for the positive token; no TIS
    loss2, m2 = policy_loss(logp, old, engine, adv, ones(1, 2), ones(1, 2), clip_eps_high=0.6, tis_cap=None)
    assert loss2.item() == pytest.approx((-1.5 + 1.5) / 2) and m2["clip_frac"] == 0 and m2["tis_mean"] == 3.0


def test_kl_to_reference():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    zero = torch.zeros(1, 2)
    loss, m = policy_loss(logp, logp.detach(), logp.detach(), zero, ones(1, 2), ones(1, 2), kl_coef=0.1, ref_logp=ref)
    k3 = math.exp(1.0) - 1.0 - 1.0  # d = ref - logp = (0, 1)
    assert m["kl_ref"] == pytest.approx(k3 / 2) and loss.item() == pytest.approx(0.1 * k3 / 2)
    with pytest.raises(AssertionError, match="needs ref_logp"):
        policy_loss(logp, logp, logp, zero, ones(1, 2), ones(1, 2), kl_coef=0.1)


def test_no_trained_tokens_and_nan_safety():
    logp = torch.tensor([[-1.0, -50.0]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0]])
    engine = torch.tensor([[-1.0, -90.0]])  # garbage under the mask: must not leak inf or nan
    loss, m = policy_loss(logp, old, engine, torch.tensor([[1.0, 1e6]]), ones(1, 2), torch.tensor([[1, 0]]))
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0 and all(math.isfinite(v) for v in m.values())
    loss, m = policy_loss(logp, old, engine, ones(1, 2), ones(1, 2), torch.zeros(1, 2))
    assert loss.item() == 0.0 and loss.requires_grad and m["tokens"] == 0.0


def test_sequence_logprobs_alignment_and_padding(tiny_config):
    """In float64, so the batched, padded forward equals the one-prefix forwards to ~1e-15 on any CPU (issue 20)."""
    model = tiny_model(tiny_config).double().eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 9))
    am = torch.ones_like(ids)
    am[1, 6:] = 0  # row 1 right-padded after 6 tokens
    with torch.no_grad():
        lp = sequence_logprobs(model, ids, am)
        assert lp.shape == (2, 9) and (lp[:, 0] == 0).all() and (lp[1, 6:] == 0).all()
        for b, n in ((0, 9), (1, 6)):
            for t in range(1, n):  # the token at t, predicted from the prefix ids[:t] alone
                ref = model(input_ids=ids[b : b + 1, :t]).logits[0, -1].log_softmax(-1)[ids[b, t]]
                assert lp[b, t].item() == pytest.approx(ref.item(), abs=1e-12), (b, t)
        hot = sequence_logprobs(model, ids, am, temperature=0.5)
        ref = (model(input_ids=ids[:1, :4]).logits[0, -1] / 0.5).log_softmax(-1)[ids[0, 4]]
        assert hot[0, 4].item() == pytest.approx(ref.item(), abs=1e-12)
    left = torch.ones_like(ids)
    left[0, 0] = 0
    with pytest.raises(AssertionError, match="right-padded"):
        sequence_logprobs(model, ids, left)


def test_sequence_logprobs_needed_matches_full_and_keeps_gradients(tiny_config):
    """Logits only where a token is needed: equal values (and gradients) there, 0.0 elsewhere (float64)."""
    model = tiny_model(tiny_config).double()
    torch.manual_seed(3)
    ids = torch.randint(0, 64, (3, 11))
    am = torch.ones_like(ids)
    am[2, 7:] = 0
    needed = torch.zeros(3, 11, dtype=torch.float64)
    needed[0, 3:5] = 1
    needed[1, 8:11] = 1
    needed[2, 6] = 1
    needed[2, 8] = 1  # padding: never needed
    full = sequence_logprobs(model, ids, am, temperature=0.7)
    part = sequence_logprobs(model, ids, am, temperature=0.7, needed=needed)
    on = needed.bool() & am.bool()
    assert torch.allclose(part[on], full[on], rtol=0, atol=1e-12)
    assert (part[~on] == 0).all()
    (g_full,) = torch.autograd.grad((full * on).sum(), model.model.embed_tokens.weight)
    (g_part,) = torch.autograd.grad(part.sum(), model.model.embed_tokens.weight)
    assert torch.allclose(g_full, g_part, rtol=0, atol=1e-12)
    nothing = sequence_logprobs(model, ids, am, needed=torch.zeros(3, 11, dtype=torch.float64))
    assert (nothing == 0).all() and nothing.requires_grad


def _head_and_reference(config, dtype=torch.float64, tied=False):
    cfg = copy.deepcopy(config)
    cfg.tie_word_embeddings = tied
    ref = tiny_model(cfg).to(dtype)
    chunked = copy.deepcopy(ref)
    install_logprob_head(chunked)
    assert isinstance(chunked.lm_head, LogprobHead) and not isinstance(ref.lm_head, LogprobHead)
    assert (chunked.lm_head.weight is chunked.model.embed_tokens.weight) is tied
    return ref, chunked


def _grads(model, out):
    return torch.autograd.grad(out, list(model.parameters()))


@pytest.mark.parametrize("chunk", [1, 3, 4096], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_chunked_head_equals_the_full_logits(tiny_config, chunk, tied):
    """Issue 21: the LogprobHead's chunked logprobs, with the logits recomputed in backward, equal the whole-logits
    computation (float64: values and every parameter's gradient to 1e-12), with and without `needed`, at a sampling
    temperature, whatever the chunk (1 row, a chunk that does not divide the rows, one chunk for all)."""
    ref, chunked = _head_and_reference(tiny_config, tied=tied)
    torch.manual_seed(5)
    ids = torch.randint(0, 64, (3, 13))
    am = torch.ones_like(ids)
    am[1, 9:] = 0
    needed = torch.zeros(3, 13, dtype=torch.float64)
    needed[0, 4:9] = 1
    needed[1, 7:13] = 1  # partly padding
    needed[2, 1] = 1
    upstream = torch.randn(3, 13, dtype=torch.float64)  # an arbitrary gradient, not just ones
    for kwargs in ({}, {"needed": needed}, {"needed": needed, "temperature": 0.7}):
        a = sequence_logprobs(ref, ids, am, **kwargs)
        b = sequence_logprobs(chunked, ids, am, chunk=chunk, **kwargs)
        assert a.shape == b.shape == (3, 13) and b.dtype == torch.float64
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (kwargs, (a - b).abs().max())
        assert (b[:, 0] == 0).all() and (b[1, 9:] == 0).all()
        ga, gb = _grads(ref, (a * upstream).sum()), _grads(chunked, (b * upstream).sum())
        for x, y in zip(ga, gb, strict=True):
            assert torch.allclose(x, y, rtol=0, atol=1e-12), (kwargs, (x - y).abs().max())
    nothing = sequence_logprobs(chunked, ids, am, needed=torch.zeros(3, 13), chunk=chunk)
    assert (nothing == 0).all() and nothing.requires_grad
    with torch.no_grad():  # outside sequence_logprobs the head is the Linear it was: logits
        assert torch.equal(chunked(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_chunked_head_under_bf16_autocast_matches_autocast_logits(tiny_config):
    """Under bf16 autocast the head multiplies in bf16 and upcasts each chunk's logits, as autocast's Linear and the
    full path do: the same logprobs to float32 rounding, and gradients within bf16's rounding of the same sum."""
    ref, chunked = _head_and_reference(tiny_config, dtype=torch.float32)
    torch.manual_seed(6)
    ids = torch.randint(0, 64, (2, 17))
    am = torch.ones_like(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = sequence_logprobs(ref, ids, am)
        b = sequence_logprobs(chunked, ids, am, chunk=5)
    assert a.dtype == b.dtype == torch.float32
    assert (a - b).abs().max() <= 1e-6 * a.abs().max(), (a - b).abs().max()
    ga, gb = _grads(ref, a.sum()), _grads(chunked, b.sum())
    for x, y in zip(ga, gb, strict=True):
        assert (x - y).norm() <= 2e-2 * x.norm() + 1e-12, ((x - y).norm(), x.norm())


def test_chunked_head_holds_no_logits_for_backward(tiny_config):
    """What the chunked path saves for backward has no [positions x vocabulary] tensor larger than one chunk, where
    the full path saves the whole logits (counted with autograd's saved-tensor hooks)."""
    cfg = copy.deepcopy(tiny_config)
    cfg.vocab_size = 4096  # the vocabulary dominates, as in Qwen3
    ref, chunked = _head_and_reference(cfg, dtype=torch.float32)
    ids = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)

    def largest_saved(model, **kw):
        sizes = []

        def pack(t):
            if t.dim() >= 1 and t.shape[-1] == cfg.vocab_size and t.dtype.is_floating_point:
                sizes.append(t.numel() // cfg.vocab_size)  # rows of vocabulary-wide values
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sequence_logprobs(model, ids, am, **kw).sum()
        return sum(sizes)  # rows of logits (or their softmax) kept, over every saved tensor

    assert largest_saved(ref) >= 4 * 63, "the full path keeps every position's logits"  # (and each row's softmax)
    assert largest_saved(chunked, chunk=16) == 0, "the chunked path keeps no logits at all"


def one_step(config, ids, mask, adv_value, adv_masked=0.0):
    model = tiny_model(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    am = torch.ones_like(ids)
    logp = sequence_logprobs(model, ids, am)
    adv = torch.where(mask.bool(), torch.full_like(logp, adv_value), torch.full_like(logp, adv_masked))
    loss, _ = policy_loss(logp, logp.detach(), logp.detach(), adv, torch.ones_like(logp), mask)
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = (logp.detach() * mask).sum().item()
    opt.step()
    with torch.no_grad():
        after = (sequence_logprobs(model, ids, am) * mask).sum().item()
    return before, after, grads


def test_one_step_moves_logprobs_with_the_advantage_sign(tiny_config):
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.zeros(2, 12)
    mask[:, 5:9] = 1  # "generated" tokens; the rest is prompt/observation
    before, after_pos, grads = one_step(tiny_config, ids, mask, +1.0)
    _, after_neg, _ = one_step(tiny_config, ids, mask, -1.0)
    assert after_pos > before + 1e-3 and after_neg < before - 1e-3, (before, after_pos, after_neg)
    # advantages on masked tokens contribute nothing: the same gradient whatever they hold
    _, _, grads_junk = one_step(tiny_config, ids, mask, +1.0, adv_masked=1e3)
    for g, h in zip(grads, grads_junk, strict=True):
        assert torch.equal(g, h)


def test_global_denominator_makes_micro_batches_add_up():
    torch.manual_seed(3)
    f64 = torch.float64  # the sums below add in another order than the full one: exact only up to rounding
    logp = torch.randn(4, 6, dtype=f64) - 2
    adv, w = torch.randn(4, 6, dtype=f64), torch.rand(4, 6, dtype=f64)
    mask = (torch.rand(4, 6) > 0.3).to(f64)
    full, _ = policy_loss(logp, logp, logp, adv, w, mask)
    total = (w * mask).sum()
    parts = [policy_loss(logp[i : i + 2], logp[i : i + 2], logp[i : i + 2], adv[i : i + 2], w[i : i + 2],
                         mask[i : i + 2], denom=total)[0] for i in (0, 2)]  # fmt: skip
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-12)


def _sample(ids, trained, adv):
    """A TrainSample of one node: prompt token ids[0], then `trained` policy tokens with advantage `adv`."""
    n = len(ids)
    mask = [0] * (n - trained) + [1] * trained
    return TrainSample(
        input_ids=ids,
        loss_mask=mask,
        advantages=[adv * m for m in mask],
        weights=[float(m) for m in mask],
        engine_logprobs=[0.0] * n,
        prompt_id="p",
        tree_index=0,
        leaf_id=1,
    )


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_loss_aggregation_weighs_a_long_failure(tiny_model, agg):
    """A 2-token success (A = +1) and an 8-token failure (A = -1). On-policy, the loss is minus the weighted mean
    advantage: token-mean counts the failure's 8 tokens against the success's 2; seq-mean counts each sample once.
    In float64: the engine's logprobs come from another forward than the update's (issue 20: abs 1e-6 in float32
    held on one CPU's reduction order only)."""
    policy = Policy(tiny_model, ModelConfig(device="cpu", dtype="float64"), OptimConfig(loss_agg=agg))
    samples = [_sample([5, 6, 7], 2, +1.0), _sample([5, 6, 7, 8, 9, 10, 11, 12, 13], 8, -1.0)]
    for s in samples:  # the engine sampled from these very weights: the TIS weight is 1
        ids = torch.tensor([s.input_ids])
        with torch.no_grad():
            s.engine_logprobs = sequence_logprobs(policy.model, ids, torch.ones_like(ids))[0].tolist()
    m = policy.rl_update(samples)
    expected = -(2 * 1.0 - 8 * 1.0) / 10 if agg == "token-mean" else 0.0
    assert m["loss"] == pytest.approx(expected, abs=1e-12)


def test_unknown_loss_aggregation_is_a_clear_error():
    with pytest.raises(ValueError, match="loss_agg"):
        OptimConfig(loss_agg="sum")


def test_token_budget_micro_batches_give_the_same_update(tiny_model):
    """Issue 21: micro-batches formed by a padded-token budget (optim.micro_batch_tokens) accumulate to the same
    optimizer step as micro-batches of a fixed count, and as one batch of everything (float64, relative to how far
    the update moved): the loss of each micro-batch is its share of the step's weighted tokens, however cut."""
    import random

    rng = random.Random(0)
    samples = []
    for n in [12, 40, 7, 33, 25, 9, 18, 60]:
        s = _sample([rng.randrange(11, 2000) for _ in range(n)], trained=n // 2, adv=rng.choice([-1.0, 1.0]))
        s.engine_logprobs = [-3.0] * n
        samples.append(s)

    def update(**optim):
        policy = Policy(tiny_model, ModelConfig(device="cpu", dtype="float64"), OptimConfig(lr=1e-3, **optim))
        start = {k: v.clone() for k, v in policy.model.state_dict().items()}
        metrics = policy.rl_update(samples)
        return start, policy.model.state_dict(), metrics

    start, whole, m_whole = update(micro_batch_size=64)
    _, counted, _ = update(micro_batch_size=3)
    _, budget, m_budget = update(micro_batch_size=64, micro_batch_tokens=80)  # 1-6 rows each
    moved = max(float((whole[k] - start[k]).abs().max()) for k in whole)
    assert moved > 1e-4
    for other in (counted, budget):
        assert max(float((whole[k] - other[k]).abs().max()) for k in whole) <= 1e-9 * moved
    assert m_budget["loss"] == pytest.approx(m_whole["loss"], rel=1e-9)
    assert m_budget["trained_tokens"] == m_whole["trained_tokens"] == sum(len(s) // 2 for s in samples)


def test_token_budget_below_the_context_is_refused():
    from trainer.config import load_train_config

    with pytest.raises(ValueError, match=r"micro_batch_tokens=512 is below rollout\.max_context_tokens"):
        load_train_config(sets=["optim.micro_batch_tokens=512", "rollout.max_context_tokens=1024"])
    with pytest.raises(ValueError, match="micro_batch_tokens >= 0"):
        OptimConfig(micro_batch_tokens=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hidden_at_signals_equal_the_full_logits(tiny_model, temperature):
    """predictor.policy_signals (issue 22): `hidden_at(..., signals=(token, T))` appends log p(token next) and the
    next-token entropy at each position, from the same batched forward, inside the chunked LM head; equal in float64
    to softmax(full logits / T) of each sequence alone (to the float32 rounding of hidden_at's rows), and the hidden-state columns are those of a plain call."""
    policy = Policy(
        tiny_model, ModelConfig(device="cpu", dtype="float64", logprob_chunk=2), OptimConfig(), temperature=temperature
    )
    torch.manual_seed(7)
    seqs = [torch.randint(11, 2000, (n,)).tolist() for n in (9, 23, 4, 15)]
    positions = [[0, 8], [3, 10, 22], [3], [14, 1, 7]]  # unsorted, and rows differing in length and count
    token = 17
    plain = policy.hidden_at(seqs, positions, batch=2)
    got = policy.hidden_at(seqs, positions, batch=2, signals=(token, temperature))
    model = policy.accelerator.unwrap_model(policy.model)
    for seq, pos, h, g in zip(seqs, positions, plain, got, strict=True):
        assert g.shape == (len(pos), h.shape[1] + 2)
        assert torch.allclose(g[:, :-2], h, rtol=0, atol=1e-12)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, pos].double() / temperature
        logp = torch.log_softmax(logits, -1)
        want = torch.stack([logp[:, token], -(logp.exp() * logp).sum(-1)], 1)
        # hidden_at's rows are float32: the float64 values rounded once (relative 6e-8)
        assert ((g[:, -2:].double() - want).abs() <= 1e-6 * want.abs()).all(), (g[:, -2:], want)

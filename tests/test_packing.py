"""Prefix-shared updates (trainer/learner/packing.py, `optim.share_prefixes`): the trie a micro-batch packs into, its
logprobs and gradients against the padded batch's, the update against the unpacked update, the plan."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from trainer.learner.config import ModelConfig, OptimConfig
from trainer.learner.loss import install_logprob_head, sequence_logprobs
from trainer.learner.packing import forest_logprobs, pack_prefixes, packed_plan
from trainer.learner.policy import Policy
from trainer.learner.samples import TrainSample


def _trees(seed: int, prompts: int = 3, leaves: int = 4) -> list[tuple[str, list[int]]]:
    """(prompt id, tokens) of tree-shaped rollouts: each prompt's leaves share its prompt, some a first turn too."""
    rng = random.Random(seed)
    out = []
    for p in range(prompts):
        prompt = [1, 2] + [rng.randrange(11, 2000) for _ in range(rng.randrange(6, 12))]  # a shared "template" first
        turn = [rng.randrange(11, 2000) for _ in range(rng.randrange(3, 7))]
        for leaf in range(leaves):
            head = prompt + (turn if leaf % 2 else [])  # half branch after the first turn, half at the prompt
            out.append((f"p{p}", head + [rng.randrange(11, 2000) for _ in range(rng.randrange(2, 9))]))
    return out


def test_pack_prefixes_holds_each_shared_prefix_once() -> None:
    seqs = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6, 7], [9, 2], [1, 2, 3, 4]]
    p = pack_prefixes(seqs)
    assert len(p.rows) == 1 and len(p) == 9
    row = p.rows[0]
    assert row.ids == [1, 2, 3, 4, 5, 6, 7, 9, 2], "each distinct prefix's last token once, parents first"
    assert p.where[4] == p.where[0], "a repeated sequence is the same path"
    for seq, (r, path) in zip(seqs, p.where, strict=True):
        assert r == 0 and [row.ids[i] for i in path] == seq
        assert [row.depth[i] for i in path] == list(range(len(seq)))
        assert [row.parent[i] for i in path] == [-1, *path[:-1]]
    m = p.mask()[0, 0]
    for i in range(len(row.ids)):  # a token sees itself and its ancestors, nothing else
        anc, j = set(), i
        while j >= 0:
            anc.add(j)
            j = row.parent[j]
        assert set(m[i].nonzero().squeeze(-1).tolist()) == anc
    assert pack_prefixes([]).rows == [] and len(pack_prefixes([[5]])) == 1


def test_pack_prefixes_makes_one_row_a_group() -> None:
    """Grouped (a prompt's samples): one trie a group, so a token both groups hold is in both rows; the rows are
    padded to the longest, and a position past a row's end attends to itself only."""
    seqs = [[1, 2, 3], [1, 2, 4, 5], [1, 7], [1, 2, 3]]
    p = pack_prefixes(seqs, ["a", "a", "b", "a"])
    assert [r.ids for r in p.rows] == [[1, 2, 3, 4, 5], [1, 7]]
    assert [r for r, _ in p.where] == [0, 0, 1, 0] and p.where[2] == (1, [0, 1])
    assert (len(p), p.width, p.padded) == (7, 5, 10)
    m = p.mask()
    assert m.shape == (2, 1, 5, 5)
    assert m[1, 0, 1].tolist() == [True, True, False, False, False]
    assert m[1, 0, 3].tolist() == [False, False, False, True, False], "padding sees itself"


def _padded(seqs: list[list[int]], rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    am = torch.zeros(len(seqs), T, dtype=torch.long)
    needed = torch.zeros(len(seqs), T, dtype=torch.float64)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        am[b, : len(s)] = 1
        needed[b, : len(s)] = torch.tensor([float(rng.random() < 0.6) for _ in s])
    return ids, am, needed


def _float64_rmsnorm(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.mark.parametrize("head", [True, False], ids=["logprob-head", "logits"])
def test_forest_logprobs_and_gradients_equal_the_padded_batch(
    tiny_model: Path, head: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One forward over the packed row gives every needed token's logprob of the padded batch (float64, through the
    chunked LogprobHead or from the logits, temperature 0.7), and the same gradients: to 1e-10 relative with the
    model's RMSNorm computed in float64; with transformers' own Qwen3RMSNorm, which computes in float32 whatever the
    model's dtype, to float32 rounding (a shared token's gradient is summed before that step here, after it
    unpacked)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3 import modeling_qwen3

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float64)
    if head:
        install_logprob_head(model)
    rng = random.Random(3)
    trees = _trees(0)
    seqs = [s for _, s in trees]
    ids, am, needed = _padded(seqs, rng)
    packed = pack_prefixes(seqs, [g for g, _ in trees])
    assert len(packed.rows) == 3 and len(packed) < 0.6 * int(am.sum()), "a row a prompt, most tokens shared"
    one_row = pack_prefixes(seqs)
    assert len(one_row.rows) == 1
    weights = torch.randn(*ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def both() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        a = sequence_logprobs(model, ids, am, temperature=0.7, needed=needed, chunk=3)
        b = forest_logprobs(model, packed, needed, temperature=0.7, chunk=3)
        one = forest_logprobs(model, one_row, needed, temperature=0.7, chunk=3)  # all prompts in one row: the same
        assert float((one - b).detach().abs().max()) <= 1e-12
        ga = torch.autograd.grad((a * weights).sum(), list(model.parameters()))
        gb = torch.autograd.grad((b * weights).sum(), list(model.parameters()))
        return a, b, ga, gb

    def rel(ga: list[torch.Tensor], gb: list[torch.Tensor]) -> float:
        return max(float((x - y).abs().max()) for x, y in zip(ga, gb, strict=True)) / max(
            float(y.abs().max()) for y in ga
        )

    a, b, ga, gb = both()
    assert (a != 0).sum() > 20 and torch.equal(a != 0, needed.bool() & (torch.arange(ids.shape[1]) >= 1))
    assert float((a - b).detach().abs().max()) <= 1e-9, "the logprobs"
    stock = rel(ga, gb)
    assert stock < 1e-5, stock
    monkeypatch.setattr(modeling_qwen3.Qwen3RMSNorm, "forward", _float64_rmsnorm)
    a, b, ga, gb = both()
    assert float((a - b).detach().abs().max()) <= 1e-12
    exact = rel(ga, gb)
    assert exact < 1e-10, exact
    print(f"\ngradient gap, relative: {stock:.3g} (Qwen3RMSNorm in float32), {exact:.3g} (in float64)")


def _samples(seed: int, leaves: int = 4) -> list[TrainSample]:
    rng = random.Random(seed)
    out = []
    for k, (pid, ids) in enumerate(_trees(seed, prompts=3, leaves=leaves)):
        n = len(ids)
        mask = [0] * 8 + [1] * (n - 8)  # the prompt's first 8 tokens untrained; later ones trained (shared turns too)
        adv = rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 1.0)
        out.append(
            TrainSample(
                ids,
                mask,
                [adv * m for m in mask],
                [m * rng.choice([1.0, 0.5]) for m in mask],
                [-rng.uniform(2.0, 6.0) * m for m in mask],
                prompt_id=pid,
                tree_index=k // leaves,
                leaf_id=k % leaves,
            )
        )
    return out


@pytest.mark.parametrize(("kl", "rows"), [(0.0, 3), (0.05, 10)], ids=["no-kl-3", "kl-10"])
def test_a_prefix_shared_update_equals_the_unpacked_update(tiny_model: Path, kl: float, rows: int) -> None:
    """`optim.share_prefixes`: one RL update (3 prompts' trees of 5 leaves; micro-batches of 3 samples, so a
    prompt's samples are cut in runs, or of 10, so two prompts' rows share a micro-batch; the KL reference's
    logprobs packed too) takes the gradient of the
    unpacked update, in float64, to float32 rounding (Qwen3RMSNorm) relative to the gradient's size, read from
    AdamW's first moment; the loss and its metrics (grad norm included) alike. (Not the parameters: AdamW's first
    step moves each by ~lr * sign(gradient), so a gradient within rounding of 0 may step either way.)"""
    samples = _samples(5, leaves=5)
    plan = packed_plan([s.input_ids for s in samples], [s.prompt_id for s in samples], 1, rows)[0][0]
    packs = [pack_prefixes([samples[i].input_ids for i in mb], [samples[i].prompt_id for i in mb]) for mb in plan]
    if rows == 3:
        assert len(plan) == 6, "each prompt's 5 samples in runs of 3 and 2"
    else:
        assert any(len(p.rows) == 2 for p in packs), "two prompts' rows in one micro-batch"

    def update(share: bool) -> tuple[list[torch.Tensor], dict, int]:
        ocfg = OptimConfig(lr=1e-3, micro_batch_size=rows, kl_coef=kl, share_prefixes=share)
        policy = Policy(tiny_model, ModelConfig(device="cpu", dtype="float64"), ocfg)
        tokens = [0]  # the tokens the policy's forwards ran
        policy.model.register_forward_pre_hook(
            lambda _m, _a, kw: tokens.__setitem__(0, tokens[0] + kw["input_ids"].numel()), with_kwargs=True
        )
        metrics = policy.rl_update(samples)
        state = policy.optimizer_state()["state"]
        return [state[k]["exp_avg"] for k in sorted(state)], metrics, tokens[0]

    plain, m_plain, n_plain = update(False)
    shared, m_shared, n_shared = update(True)
    assert n_shared < 0.6 * n_plain, f"the packed update ran {n_shared} tokens against {n_plain}"
    size = max(float(g.abs().max()) for g in plain)
    gap = max(float((a - b).abs().max()) for a, b in zip(plain, shared, strict=True))
    assert size > 1e-4 and gap <= 1e-5 * size, (gap, size)
    assert m_shared.keys() == m_plain.keys()
    for key in m_plain:
        assert m_shared[key] == pytest.approx(m_plain[key], rel=1e-6, abs=1e-9), key
    print(f"\nprefix-shared update vs unpacked: gradient gap {gap:.3g} of {size:.3g}; {n_shared} tokens, not {n_plain}")


def test_packed_plan_keeps_a_prompts_samples_together_under_both_limits() -> None:
    trees = _trees(1, prompts=4, leaves=5)
    seqs, groups = [s for _, s in trees], [g for g, _ in trees]
    shuffled = list(range(len(seqs)))
    random.Random(0).shuffle(shuffled)  # samples of a prompt need not arrive together
    seqs, groups = [seqs[i] for i in shuffled], [groups[i] for i in shuffled]
    by_prompt = {g: [i for i in range(len(seqs)) if groups[i] == g] for g in dict.fromkeys(groups)}
    runs = list(by_prompt.values())

    def one_rank(rows: int, tokens: int = 0) -> list[list[int]]:
        plan, n_mb = packed_plan(seqs, groups, 1, rows, tokens)
        assert len(plan) == 1 and n_mb == len(plan[0])
        return plan[0]

    assert one_rank(8) == runs, "5 + 5 > 8: a prompt a micro-batch"
    assert one_rank(10) == [runs[0] + runs[1], runs[2] + runs[3]]
    assert one_rank(3) == [r for run in runs for r in (run[:3], run[3:])], "runs of <= 3"
    widths = [pack_prefixes([seqs[i] for i in run]).width for run in runs]
    budget = 2 * max(widths[:2])  # two rows, the longer one's width
    plan = one_rank(100, budget)
    assert plan[0] == runs[0] + runs[1], "counted as packed rows (rows x the longest), not as padded samples"
    assert sum(len(seqs[i]) for i in plan[0]) > budget, "the samples hold more tokens than the budget"
    assert one_rank(100, 1) == [[i] for run in runs for i in run], "a sequence over the budget alone"
    cut = one_rank(100, widths[0] - 1)  # the first prompt's samples no longer fit one row: cut into runs
    assert cut[0] != runs[0] and all(groups[i] == groups[runs[0][0]] for i in cut[0]), "the first prompt, cut"
    assert all(pack_prefixes([seqs[i] for i in mb], [groups[i] for i in mb]).padded <= widths[0] - 1 for mb in cut)
    # Several ranks: whole runs to each, balanced by packed tokens; every rank runs the count the busiest needs.
    plan, n_mb = packed_plan(seqs, groups, 3, 8)
    assert sorted(i for p in plan for mb in p for i in mb) == list(range(len(seqs)))
    assert sorted(sorted(mb) for p in plan for mb in p) == sorted(sorted(r) for r in runs)
    assert [len(p) for p in plan] == [1, 1, 2] and n_mb == 2, plan


def test_eager_attention_is_refused(tiny_model: Path) -> None:
    """Eager attention adds a 4D mask to the scores: a boolean tree mask would not mask there. Refused, not wrong."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), attn_implementation="eager")
    packed = pack_prefixes([[1, 2, 3], [1, 2, 4]])
    with pytest.raises(ValueError, match="sdpa attention, not 'eager'"):
        forest_logprobs(model, packed, torch.ones(2, 3))


def test_samples_rebuilt_from_a_tree_dump_share_exactly_the_dumps_nodes() -> None:
    """tools.tree_samples (the packed-update bench's and gpu-check's input): one sample per trained leaf, each node's
    tokens drawn once, so a prompt's samples pack into exactly the tokens of the nodes its trained leaves pass
    through, and each sample trains exactly its path's generated tokens."""
    from tools.tree_samples import TREES, samples_from_dump
    from trainer.dumps import read_dump

    dump = TREES / "epochs-trace-step50.jsonl.gz"
    samples = samples_from_dump(dump)
    _, records = read_dump(dump)
    assert len(samples) == sum(1 for r in records for n in r["nodes"] if not n["children"] and n["trained"])
    for t, rec in enumerate(records):
        nodes = {n["node_id"]: n for n in rec["nodes"]}
        mine = [s for s in samples if s.tree_index == t]
        on_paths: set[int] = set()
        for s in mine:
            i, tokens, generated = s.leaf_id, 0, 0
            while i is not None:
                on_paths.add(i)
                tokens += nodes[i]["tokens"]
                generated += nodes[i]["generated"] if nodes[i]["parent"] is not None else 0
                i = nodes[i]["parent"]
            assert (len(s.input_ids), sum(s.loss_mask)) == (tokens, generated)
        if mine:
            assert len(pack_prefixes([s.input_ids for s in mine])) == sum(nodes[i]["tokens"] for i in on_paths)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_every_packed_micro_batch_keeps_the_token_budget_on_any_number_of_ranks(size: int) -> None:
    """The budget holds for what is packed, not for what the plan counted: a prompt cut into runs whose runs the
    ranks' shares split (its first and third on one rank) must not meet in one micro-batch, where they would pack
    into one row wider than counted. The smallest such case first (a prompt of three sequences sharing nothing,
    10, 25 and 10 tokens, and a prompt of one, 2 ranks, a budget of 30: the first and third runs met in one
    micro-batch of 2 rows x 20 = 40 packed tokens), then random trees at several budgets."""
    cases = [([list(range(100, 110)), list(range(200, 225)), list(range(300, 310)), list(range(400, 410))],
              ["a", "a", "a", "c"], [30])]  # fmt: skip
    for seed in range(4):
        trees = _trees(seed, prompts=5, leaves=6)
        seqs = [s for _, s in trees]
        order = list(range(len(seqs)))
        random.Random(seed).shuffle(order)
        widest = max(len(s) for s in seqs)
        cases.append(([seqs[i] for i in order], [trees[i][0] for i in order], [widest, 2 * widest, 3 * widest]))
    for seqs, groups, budgets in cases:
        for tokens in budgets:
            for rows in (3, 8):
                plan, n_mb = packed_plan(seqs, groups, size, rows, tokens)
                assert sorted(i for p in plan for mb in p for i in mb) == list(range(len(seqs)))
                assert n_mb == max(len(p) for p in plan)
                for mb in (mb for p in plan for mb in p):
                    cost = pack_prefixes([seqs[i] for i in mb], [groups[i] for i in mb]).padded
                    assert len(mb) <= rows and (cost <= tokens or len(mb) == 1), (size, tokens, rows, mb, cost)

"""Prefix-shared updates (`optim.share_prefixes`): a micro-batch's sequences packed into one row, each shared prefix
token computed once.

A tree rollout's leaves share their prompt and every turn above their branch point; a GRPO group shares its prompt.
The unpacked update runs every leaf's whole sequence, so a shared token is computed once per leaf that holds it.
Here a micro-batch's sequences become a trie (`pack_prefixes`): one row of the unique tokens, parents before
children, each token's position id its depth, and an attention mask that lets a token see exactly its ancestors
and itself (a 4D boolean mask, which transformers hands to the attention kernel as it is). A token's hidden state is
then the one it has in any of the sequences that hold it, and the logprob of token i is read from its parent's hidden
state (`forest_logprobs`). Each sequence's [T] logprobs are gathered back from the row, so the loss, its weights and
the PPO ratios are the unpacked update's, per sequence; the backward sums a shared token's gradient over the
sequences that hold it, as the unpacked update sums it over their rows.

Exactness: the logprobs equal the unpacked ones; the gradients too in exact arithmetic. In a float64 model they
agree to ~1e-7 relative, not 1e-15: transformers' Qwen3RMSNorm computes in float32 whatever the model's dtype, and a
shared token's gradient is summed before that float32 step here and after it unpacked (with the norm computed in
float64 the two agree to 4e-14; tests/test_packing.py).

Cost: the row is N unique tokens with an N x N mask; attention is O(N^2) as a padded batch's is O(rows x T^2), and
with a mask the kernel cannot take its causal fast path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainer.learner.loss import LogprobHead, _head_request, _HeadRequest


@dataclass
class Packed:
    """Sequences as one row of unique tokens (a trie, parents before children)."""

    ids: list[int]
    """The row's tokens."""
    parent: list[int]
    """Each token's parent in the row (-1: the first token of some sequence)."""
    depth: list[int]
    """Each token's position in the sequences that hold it (its position id)."""
    where: list[list[int]]
    """where[b][t]: the row index of sequence b's token t."""

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, device: torch.device | str = "cpu") -> Tensor:
        """[1, 1, N, N] bool: row i may attend to row j iff j is i or one of its ancestors."""
        n = len(self.ids)
        anc = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(self.parent):  # parents come first: their rows are complete
            if p >= 0:
                anc[i] = anc[p]
            anc[i, i] = True
        return anc[None, None].to(device)


def pack_prefixes(seqs: Sequence[Sequence[int]]) -> Packed:
    """The trie of `seqs`: one row holding each distinct prefix's last token once. Sequences that share their first
    k tokens share those k rows; sequences with different first tokens share nothing (a forest)."""
    ids: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    children: list[dict[int, int]] = []
    roots: dict[int, int] = {}
    where: list[list[int]] = []
    for seq in seqs:
        path: list[int] = []
        node = -1
        for t, tok in enumerate(seq):
            table = roots if node < 0 else children[node]
            nxt = table.get(tok)
            if nxt is None:
                nxt = len(ids)
                ids.append(int(tok))
                parent.append(node)
                depth.append(t)
                children.append({})
                table[tok] = nxt
            path.append(nxt)
            node = nxt
        where.append(path)
    return Packed(ids, parent, depth, where)


def forest_logprobs(
    model: nn.Module,
    packed: Packed,
    needed: Tensor,
    temperature: float = 1.0,
    chunk: int = 1024,
) -> Tensor:
    """`trainer.learner.loss.sequence_logprobs` for the sequences `packed` holds, from one forward over its row:
    out[b, t] = log p(token t of sequence b | its tokens before t), at the (b, t) where `needed` [B, T] (right-padded,
    T >= the longest sequence) is nonzero and t >= 1; 0.0 elsewhere. Through the model's `LogprobHead` when it has
    one (the token logprobs in chunks, inside the head's forward, as the unpacked path), else from the logits."""
    device = needed.device
    B, T = needed.shape
    assert B == len(packed.where), f"needed has {B} rows for {len(packed.where)} sequences"
    n = len(packed)
    index = torch.zeros(B, T, dtype=torch.long)
    real = torch.zeros(B, T, dtype=torch.bool)
    for b, path in enumerate(packed.where):
        assert len(path) <= T, f"sequence {b} has {len(path)} tokens, needed only {T} columns"
        index[b, : len(path)] = torch.tensor(path, dtype=torch.long)
        real[b, 1 : len(path)] = True  # t = 0 has no logprob
    index, real = index.to(device), real.to(device)
    want = needed.bool() & real
    node_needed = torch.zeros(n, dtype=torch.bool, device=device)
    node_needed[index[want]] = True
    nodes = node_needed.nonzero().squeeze(-1)
    parent = torch.tensor(packed.parent, dtype=torch.long, device=device)
    ids = torch.tensor([packed.ids], dtype=torch.long, device=device)
    inputs = {
        "input_ids": ids,
        "attention_mask": packed.mask(device),
        "position_ids": torch.tensor([packed.depth], dtype=torch.long, device=device),
        "use_cache": False,
    }
    if nodes.numel() == 0:  # nothing needed: one position, no logprob computed, so the output still has a graph
        nodes = torch.zeros(1, dtype=torch.long, device=device)
        keep, pairs = nodes, torch.zeros(1, 1, dtype=torch.bool, device=device)
    else:
        keep, pairs = parent[nodes], torch.ones(1, nodes.numel(), dtype=torch.bool, device=device)
    targets = ids[:, nodes]
    base = getattr(model, "module", model)
    if isinstance(base.get_output_embeddings(), LogprobHead):
        with _head_request(_HeadRequest(targets, pairs, temperature, chunk)):
            lp = model(**inputs, logits_to_keep=keep).logits[0]  # [K]: a parent kept once per child needed
    else:
        logits = model(**inputs, logits_to_keep=keep).logits[0]
        lg = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        lp = (lg.gather(-1, targets[0].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1)) * pairs[0]
    node_lp = lp.new_zeros(n).index_copy(0, nodes, lp)
    return node_lp[index] * want.to(node_lp.dtype)


def packed_plan(seqs: Sequence[Sequence[int]], groups: Sequence[str], rows: int, tokens: int = 0) -> list[list[int]]:
    """Micro-batches (indices into `seqs`) for prefix-shared updates on one rank: the sequences of one group (a
    prompt: its samples share at least the prompt) kept together, cut into runs of at most `rows`; runs then fill
    micro-batches in order, at most `rows` sequences and, when `tokens` > 0, at most `tokens` unique tokens each (a
    run over the budget trains alone). Every index once."""
    assert rows >= 1 and tokens >= 0, (rows, tokens)
    order: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    runs = [members[k : k + rows] for members in order.values() for k in range(0, len(members), rows)]
    out: list[list[int]] = []
    cur: list[int] = []
    for run in runs:
        grown = cur + run
        if cur and (len(grown) > rows or (tokens and len(pack_prefixes([seqs[i] for i in grown])) > tokens)):
            out.append(cur)
            grown = list(run)
        cur = grown
    if cur:
        out.append(cur)
    return out

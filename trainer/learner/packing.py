"""Prefix-shared updates (`optim.share_prefixes`): a micro-batch's sequences packed so that each shared prefix token
is computed once.

A tree rollout's leaves share their prompt and every turn above their branch point; a GRPO group shares its prompt.
The unpacked update runs every leaf's whole sequence, so a shared token is computed once per leaf that holds it.
Here each prompt's sequences in a micro-batch become a trie (`pack_prefixes`), one row of its unique tokens, parents
before children, each token's position id its depth, with an attention mask that lets a token see exactly its
ancestors and itself (a 4D boolean mask, which transformers hands to the attention kernel as it is). A token's
hidden state is then the one it has in any of the sequences that hold it, and the logprob of token i is read from
its parent's hidden state (`forest_logprobs`, inside the chunked LM head). Each sequence's [T] logprobs are gathered
back from the rows, so the loss, its weights and the PPO ratios are the unpacked update's, per sequence; the backward
sums a shared token's gradient over the sequences that hold it, as the unpacked update sums it over their rows.

One row a prompt, not one for the micro-batch: attention is quadratic in a row's length, and prompts share little
(a chat template's first tokens), so one row for all would cost more attention than the padded batch saves. The
mask is W x W a row (bool), and with it the attention cannot take the flash kernel: memory the token budget does not
count (it counts rows x W tokens). Needs the model's sdpa attention (eager adds a 4D mask to the scores).

Exactness: the logprobs equal the unpacked ones (in float64; in bf16 the masked kernel may round differently from
the causal one); the gradients too in exact arithmetic. In a float64 model they
agree to ~1e-7 relative (1.2e-7 measured; the test bounds it by 1e-5), not ~1e-15: transformers' Qwen3RMSNorm computes in float32 whatever the model's dtype, and a
shared token's gradient is summed before that float32 step here and after it unpacked (with the norm computed in
float64 the two agree to 2.6e-15 measured; tests/test_packing.py bounds it by 1e-10)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trainer.learner.distributed import token_shares
from trainer.learner.loss import LogprobHead, _head_request, _HeadRequest


@dataclass
class Row:
    """One trie as a row of unique tokens, parents before children."""

    ids: list[int] = field(default_factory=list)
    """The row's tokens."""
    parent: list[int] = field(default_factory=list)
    """Each token's parent in the row (-1: the first token of some sequence)."""
    depth: list[int] = field(default_factory=list)
    """Each token's position in the sequences that hold it (its position id)."""

    def ancestors(self, width: int) -> Tensor:
        """[width, width] bool: position i may attend to j iff j is i or one of its ancestors; a position past the
        row's end attends to itself only (a finite softmax, never read)."""
        anc = torch.eye(width, dtype=torch.bool)
        for i, p in enumerate(self.parent):  # parents come first: their rows are complete
            if p >= 0:
                anc[i] = anc[p]
                anc[i, i] = True
        return anc


@dataclass
class Packed:
    """Sequences as rows of unique tokens: one trie a group (a prompt's samples)."""

    rows: list[Row]
    where: list[tuple[int, list[int]]]
    """where[b] = (row, path): path[t] is the position of sequence b's token t in that row."""
    _mask: Tensor | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        """The unique tokens, all rows."""
        return sum(len(r.ids) for r in self.rows)

    @property
    def width(self) -> int:
        return max((len(r.ids) for r in self.rows), default=0)

    @property
    def padded(self) -> int:
        """The tokens a forward over the rows computes: rows x the longest row."""
        return len(self.rows) * self.width

    def mask(self, device: torch.device | str = "cpu") -> Tensor:
        """[R, 1, W, W] bool: each row's `Row.ancestors`, built once (the KL reference's forward and later PPO epochs
        reuse it) and kept on the host: each forward takes its own device copy, freed after it, since an update
        keeps every micro-batch's pack until it ends (a device copy kept would hold every mask on the GPU at once)."""
        if self._mask is None:
            w = self.width
            self._mask = torch.stack([r.ancestors(w) for r in self.rows])[:, None]
        return self._mask.to(device)


class _Trie:
    """One group's trie, grown a sequence at a time: its row, and how many tokens a sequence would add to it."""

    def __init__(self) -> None:
        self.row = Row()
        self.roots: dict[int, int] = {}
        self.children: list[dict[int, int]] = []

    def __len__(self) -> int:
        return len(self.row.ids)

    def novel(self, seq: Sequence[int]) -> int:
        """The tokens `add(seq)` would add: those after the longest prefix of `seq` already in the row."""
        node, table = -1, self.roots
        for t, tok in enumerate(seq):
            node = table.get(tok, -1)
            if node < 0:
                return len(seq) - t
            table = self.children[node]
        return 0

    def add(self, seq: Sequence[int]) -> list[int]:
        """Insert `seq`; its tokens' positions in the row."""
        row, path, node = self.row, [], -1
        for t, tok in enumerate(seq):
            table = self.roots if node < 0 else self.children[node]
            nxt = table.get(tok)
            if nxt is None:
                nxt = len(row.ids)
                row.ids.append(int(tok))
                row.parent.append(node)
                row.depth.append(t)
                self.children.append({})
                table[tok] = nxt
            path.append(nxt)
            node = nxt
        return path


def pack_prefixes(seqs: Sequence[Sequence[int]], groups: Sequence[str] | None = None) -> Packed:
    """One trie a group of `seqs` (all in one without `groups`): a row holding each distinct prefix's last token
    once. Sequences of a group that share their first k tokens share those k positions; sequences with different
    first tokens share nothing (a forest in the row). Groups keep attention per row: one row for sequences that
    share little would make attention quadratic in all their tokens."""
    keys = list(groups) if groups is not None else [""] * len(seqs)
    assert len(keys) == len(seqs), f"{len(keys)} groups for {len(seqs)} sequences"
    tries: dict[str, tuple[int, _Trie]] = {}  # group -> its row's index, its trie
    where: list[tuple[int, list[int]]] = []
    for seq, key in zip(seqs, keys, strict=True):
        if key not in tries:
            tries[key] = (len(tries), _Trie())
        r, trie = tries[key]
        where.append((r, trie.add(seq)))
    return Packed([trie.row for _, trie in tries.values()], where)


def forest_logprobs(
    model: nn.Module,
    packed: Packed,
    needed: Tensor,
    temperature: float = 1.0,
    chunk: int = 1024,
) -> Tensor:
    """`trainer.learner.loss.sequence_logprobs` for the sequences `packed` holds, from one forward over its rows:
    out[b, t] = log p(token t of sequence b | its tokens before t), at the (b, t) where `needed` [B, T] (right-padded,
    T >= the longest sequence) is nonzero and t >= 1; 0.0 elsewhere. Through the model's `LogprobHead` when it has
    one (the token logprobs in chunks, inside the head's forward, as the unpacked path: each needed token read at
    its parent's position), else from the whole logits (the reference path, for tests)."""
    device = needed.device
    base = getattr(model, "module", model)
    impl = getattr(getattr(base, "config", None), "_attn_implementation", "sdpa")
    if impl != "sdpa":  # eager adds a 4D mask to the scores: a boolean one would not mask
        raise ValueError(f"prefix-shared updates need the model's sdpa attention, not {impl!r}")
    B, T = needed.shape
    assert B == len(packed.where), f"needed has {B} rows for {len(packed.where)} sequences"
    R, W = len(packed.rows), packed.width
    index = torch.zeros(B, T, dtype=torch.long)  # into the rows flattened: row * W + position
    real = torch.zeros(B, T, dtype=torch.bool)
    for b, (r, path) in enumerate(packed.where):
        assert len(path) <= T, f"sequence {b} has {len(path)} tokens, needed only {T} columns"
        index[b, : len(path)] = r * W + torch.tensor(path, dtype=torch.long)
        real[b, 1 : len(path)] = True  # t = 0 has no logprob
    index, real = index.to(device), real.to(device)
    want = needed.bool() & real
    node_needed = torch.zeros(R * W, dtype=torch.bool, device=device)
    node_needed[index[want]] = True
    flat = node_needed.nonzero().squeeze(-1)  # the needed tokens, row by row
    row_of, pos = flat // W, flat % W
    count = torch.bincount(row_of, minlength=R)
    K = max(1, int(count.max()) if flat.numel() else 1)
    slot = torch.arange(flat.numel(), device=device) - (torch.cumsum(count, 0) - count)[row_of]  # k within its row
    parent = torch.full((R, W), 0, dtype=torch.long)
    ids = torch.zeros(R, W, dtype=torch.long)
    depth = torch.zeros(R, W, dtype=torch.long)
    for r, row in enumerate(packed.rows):
        n = len(row.ids)
        ids[r, :n] = torch.tensor(row.ids, dtype=torch.long)
        depth[r, :n] = torch.tensor(row.depth, dtype=torch.long)
        parent[r, :n] = torch.tensor(row.parent, dtype=torch.long).clamp(min=0)
    ids, depth, parent = ids.to(device), depth.to(device), parent.to(device)
    at = torch.zeros(R, K, dtype=torch.long, device=device)  # (row, k): the parent position it reads
    targets = torch.zeros(R, K, dtype=torch.long, device=device)
    pairs = torch.zeros(R, K, dtype=torch.bool, device=device)
    at[row_of, slot] = parent[row_of, pos]
    targets[row_of, slot] = ids[row_of, pos]
    pairs[row_of, slot] = True
    inputs = {"input_ids": ids, "attention_mask": packed.mask(device), "position_ids": depth, "use_cache": False}
    if isinstance(base.get_output_embeddings(), LogprobHead):
        with _head_request(_HeadRequest(targets, pairs, temperature, chunk, index=at)):
            lp = model(**inputs, logits_to_keep=0).logits  # [R, K]: the head reads each pair's parent position
    else:
        logits = model(**inputs).logits  # [R, W, V]
        lg = logits.gather(1, at.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        lg = lg.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        lp = (lg.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1)) * pairs
    node_lp = lp.new_zeros(R * W).index_put((flat,), lp[row_of, slot])
    return node_lp[index] * want.to(node_lp.dtype)


def packed_plan(
    seqs: Sequence[Sequence[int]], groups: Sequence[str], size: int, rows: int, tokens: int = 0
) -> tuple[list[list[list[int]]], int]:
    """For each of `size` ranks, its micro-batches (indices into `seqs`) for prefix-shared updates, and the number
    every rank runs (the most any rank has; the others pad with blank ones), as `micro_batch_plan` gives them
    unpacked. The sequences of one group (a prompt: its samples share at least the prompt) stay together, cut into
    runs under both limits: at most `rows` sequences and, when `tokens` > 0, at most `tokens` packed tokens (rows,
    one a group, x the longest row: what the forward computes; a sequence over the budget alone). Runs go to the
    ranks balanced by their packed tokens (`token_shares`) and fill each rank's micro-batches in order under the
    same limits. Every index once."""
    assert rows >= 1 and tokens >= 0 and size >= 1, (rows, tokens, size)
    order: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    runs: list[list[int]] = []
    width: list[int] = []  # each run's row: its unique tokens (a run is one group: one row)
    group: list[str] = []  # each run's group
    for g, members in order.items():  # a group's runs: at most `rows` sequences and `tokens` packed tokens each
        run: list[int] = []
        trie = _Trie()
        for i in members:
            if run and (len(run) >= rows or (tokens and len(trie) + trie.novel(seqs[i]) > tokens)):
                runs.append(run)
                width.append(len(trie))
                group.append(g)
                run, trie = [], _Trie()
            trie.add(seqs[i])
            run.append(i)
        runs.append(run)
        width.append(len(trie))
        group.append(g)
    plan: list[list[list[int]]] = []
    for share in token_shares(width, size):
        out: list[list[int]] = []
        cur: list[int] = []  # the runs of the micro-batch being filled: distinct groups, so one row each
        for j in sorted(share):  # a rank's runs in the order their groups came
            grown = [*cur, j]
            samples = sum(len(runs[k]) for k in grown)
            # a second run of a group already in it closes the micro-batch: packed together, the two runs would be
            # one row wider than the cost counted here (two runs of a group meet when the ranks' shares split the
            # group's runs, e.g. its first and third on one rank)
            again = group[j] in {group[k] for k in cur}
            if cur and (again or samples > rows or (tokens and len(grown) * max(width[k] for k in grown) > tokens)):
                out.append([i for k in cur for i in runs[k]])
                grown = [j]
            cur = grown
        if cur:
            out.append([i for k in cur for i in runs[k]])
        plan.append(out)
    return plan, max((len(p) for p in plan), default=0)

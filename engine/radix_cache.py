"""The prefix cache: a token-level radix tree whose nodes hold the K/V of their token segment for every layer.

Contract. `match(ids, limit)` returns the longest cached prefix of `ids`, at most `limit` tokens, as views into the
tree; `insert(ids, kv_of)` caches `ids`, asking `kv_of` only for the KV of the part not yet cached. The tree holds at
most `capacity` tokens after every insert: least recently used leaves (by `match`/`insert` time) are evicted first.
`flush` empties it. Capacity 0 disables it (inserts are no-ops).

How the scheduler uses it (`scheduler.Scheduler`): lookups are capped at `len(prompt) - 1` (the last prompt token
is always recomputed: its logits give the first output token; SGLang caps the same way), and
`meta_info.cached_tokens` is exactly the matched count. The prompt's KV is inserted right after its prefill, so
branches of one node admitted in the same step already hit it, and prompt + output[:-1] (every token whose KV
exists; the last sampled token was never fed) is inserted when a request finishes, so the next turn of an episode,
which re-sends prompt + output + observation, hits it. A weight update flushes it (unless asked not to, as in
SGLang).

Single-threaded like the rest of the engine: nothing here takes a lock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [kv_heads, tokens, head_dim]


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
        stay valid until the next `insert` or `flush`, so copy them before either (`Scheduler._prefill` does)."""
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

"""Preallocated KV buffers that transformers' models write into: the running batch's cache and a prefill's cache.

Contract. A `KVLayer` is one layer's K/V, `[batch, kv_heads, capacity, head_dim]`, whose first `n` columns are
filled; `keys`/`values` are views of exactly those columns. transformers calls `update` with the new tokens' K/V for
every row; the buffer doubles when full, so appending is amortised O(1) per token (transformers' DynamicCache
re-concatenates the whole cache on every token, measured 5x slower per decode step at 16 x 2k tokens on these
machines). A `transformers.cache_utils.Cache(layers=[KVLayer, ...])` is what the scheduler passes as `cache=` (`past_key_values=` on transformers 5.19).

The layout of the rows (left padding so every row ends at column `n`, the attention mask, position ids) is the
scheduler's (`scheduler.Scheduler`); this module only stores columns.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from engine.radix_cache import KV

# Initial spare columns in a fresh KV buffer; it doubles when full (amortised O(1) per token).
KV_HEADROOM = 64


class KVLayer(DynamicLayer):
    """One layer's batched KV in a preallocated buffer that doubles when full. transformers calls `update` with
    the new tokens' K/V for every row; `keys`/`values` are views of the filled columns."""

    def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, n: int) -> None:
        """Adopt buffers [batch, kv_heads, capacity, head_dim] whose first `n` columns are filled."""
        super().__init__()
        assert kbuf.shape == vbuf.shape and n <= kbuf.shape[2], f"{tuple(kbuf.shape)} {tuple(vbuf.shape)} n={n}"
        self.kbuf, self.vbuf, self.n = kbuf, vbuf, n
        self.device = kbuf.device
        self.is_initialized = True
        self._views()

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor, capacity: int) -> KVLayer:
        """A layer holding a copy of k, v [batch, kv_heads, n, head_dim] with room for `capacity` columns."""
        b, h, n, d = k.shape
        kbuf, vbuf = k.new_zeros((b, h, max(capacity, n), d)), v.new_zeros((b, h, max(capacity, n), d))
        kbuf[:, :, :n] = k
        vbuf[:, :, :n] = v
        return cls(kbuf, vbuf, n)

    def _views(self) -> None:
        self.keys = self.kbuf[:, :, : self.n]
        self.values = self.vbuf[:, :, : self.n]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("KVLayer is created initialized")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        add = key_states.shape[-2]
        if self.n + add > self.kbuf.shape[2]:
            self.reserve(max(2 * self.kbuf.shape[2], self.n + add))
        self.kbuf[:, :, self.n : self.n + add] = key_states
        self.vbuf[:, :, self.n : self.n + add] = value_states
        self.n += add
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n

    def reserve(self, capacity: int) -> None:
        if capacity <= self.kbuf.shape[2]:
            return
        b, h, _, d = self.kbuf.shape
        kbuf, vbuf = self.kbuf.new_zeros((b, h, capacity, d)), self.vbuf.new_zeros((b, h, capacity, d))
        kbuf[:, :, : self.n] = self.keys
        vbuf[:, :, : self.n] = self.values
        self.kbuf, self.vbuf = kbuf, vbuf
        self._views()


def cache_from_segments(segments: list[KV], n: int, capacity: int) -> Cache:
    """A one-row transformers Cache over `KVLayer`s holding the `n` tokens of `segments` (from
    `RadixKVCache.match`), copied once into buffers with room for `capacity` tokens."""
    layers = []
    for li in range(len(segments[0])):
        h, _, d = segments[0][li][0].shape
        kbuf = segments[0][li][0].new_zeros((1, h, max(capacity, n), d))
        vbuf = torch.zeros_like(kbuf)
        col = 0
        for seg in segments:
            k, v = seg[li]
            kbuf[0, :, col : col + k.shape[1]] = k
            vbuf[0, :, col : col + k.shape[1]] = v
            col += k.shape[1]
        assert col == n, f"segments hold {col} tokens, expected {n}"
        layers.append(KVLayer(kbuf, vbuf, n))
    return Cache(layers=layers)

"""Bounded staleness, enforced per sample (DESIGN §3: "bounded staleness, config").

Versions: the engines serve version 0 (the starting weights; a resumed run pushes its checkpoint as the
version it resumes at), and step t's update turns version v into v + 1, which the loop pushes to the engines
(`Policy.version` follows it). Every node records the version that generated it, and a `TrainSample` the oldest
along its path (`min_weight_version`). A step's update runs on the weights of version v = `Policy.version`, so
a sample's staleness is v - min_weight_version: the updates made between the weights that sampled it and the
weights it now trains.

- max_staleness 0 (on-policy): step t's rollouts start after step t - 1's push and run on the version the update
  of step t starts from: staleness 0 for every sample, nothing is dropped.
- max_staleness 1: step t + 1's rollouts start while step t trains, on version v, and move to v + 1 when its
  push lands; they train at v + 1: staleness 0 or 1, nothing is dropped either.
- A sample staler than max_staleness (a collection that outlived more than max_staleness updates, an engine
  that did not take a push) is dropped from the update and counted (`stale_samples` in the metrics), never kept
  or dropped silently. A sample newer than the policy cannot come from this run's engines, and is an error.
"""

from __future__ import annotations

from collections.abc import Sequence

from trainer.learner.samples import TrainSample


def drop_stale(samples: Sequence[TrainSample], version: int, max_staleness: int) -> tuple[list[TrainSample], int]:
    """(the samples at most max_staleness versions older than `version`, how many were dropped)."""
    assert max_staleness >= 0, f"max_staleness={max_staleness}"
    newer = [s.min_weight_version for s in samples if s.min_weight_version > version]
    assert not newer, f"samples of weight versions {sorted(set(newer))} are newer than the policy's {version}"
    kept = [s for s in samples if version - s.min_weight_version <= max_staleness]
    return kept, len(samples) - len(kept)

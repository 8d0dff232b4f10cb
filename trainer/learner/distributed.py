"""Training on several ranks: rank 0 leads, the others follow.

`trace-train` launched as N processes (`accelerate launch --num_processes N` or `torchrun --nproc-per-node N`,
which accelerate reads) runs the whole trainer on rank 0 only: the env server and the engines, the env and engine
clients, allocation, the predictor, evaluation, metrics. Ranks 1..N-1 run `follow()`: they build the same
`trainer.learner.policy.Policy` and join its collective calls — the RL and SFT updates, weight saves, optimizer-state
gathers and, under FSDP, the predictor's feature forwards — when rank 0 makes them. So one env server and one set
of engines serve the run, whatever N is.

The protocol (`Ranks`): before each collective call of the policy, rank 0 broadcasts the call's name and its
small arguments over a gloo group of its own (`Ranks.announce`); the followers, waiting in `Ranks.receive`, then
make the same call. Bulk data goes with the call: rank 0 scatters each rank its share (`Ranks.scatter`), results
come back with `Ranks.gather` and `Ranks.sum`. The group is gloo whatever the training backend (NCCL on GPUs),
and waits up to `COMMAND_TIMEOUT` (followers idle while rank 0 generates rollouts for minutes).

Shares (`token_shares`): every rank trains on a share of the step's samples balanced by tokens (longest first, to
the rank with the fewest tokens so far), and every rank runs the same number of micro-batches — a rank with fewer
pads with zero-weight ones — so each backward's gradient all-reduce (DDP) or reduce-scatter (FSDP) has every rank
in it and none can hang. Losses are scaled by each micro-batch's share of the step's weighted tokens over all
ranks, times N (DDP and FSDP average gradients over ranks): one update on N ranks is the update on one rank, on
the same batch, within float tolerance (tests/test_distributed.py).

If rank 0 fails, it exits non-zero and the launcher (torchrun, accelerate launch) stops the others.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch
import torch.distributed as dist

log = structlog.get_logger("trainer")

COMMAND_TIMEOUT = datetime.timedelta(days=7)
"""How long a follower waits for rank 0's next call (rollouts, evaluation and the SFT data build run in between)."""

STOP = "stop"


_CURRENT: Ranks | None = None


def current() -> Ranks:
    """This process's ranks: what `Ranks.start` joined, else one rank."""
    return _CURRENT if _CURRENT is not None else Ranks()


def launched_ranks() -> int:
    """The number of ranks this process was launched as (WORLD_SIZE, set by torchrun and accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}
"""The FSDP settings `accelerate launch --config_file configs/accelerate/fsdp2.yaml` gives the ranks, for launching
them under torchrun instead (tests, benches, tools/gpu_check.py). The wrap policy matters: without it accelerate wraps
nothing (NO_WRAP), the whole model one FSDP unit, which is not how the trainer runs."""


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP the way accelerate reads it (ACCELERATE_USE_FSDP=true: `accelerate launch`
    with an FSDP config sets it; under torchrun it is set by hand)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


@dataclass
class Ranks:
    """This process's place among the training ranks, and the command channel between them."""

    rank: int = 0
    size: int = 1
    group: Any = field(default=None, repr=False)
    closed: bool = field(default=False, repr=False)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.size > 1

    @classmethod
    def start(cls, *, cpu: bool) -> Ranks:
        """Join the launched ranks: accelerate initialises the default process group (gloo on CPU, NCCL on GPUs)
        from the launcher's environment, then every rank creates the gloo command group. One rank: no group."""
        if launched_ranks() <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        group = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
        ranks = cls(rank=state.process_index, size=state.num_processes, group=group)
        log.info("training ranks", rank=ranks.rank, size=ranks.size, backend=dist.get_backend())
        global _CURRENT
        _CURRENT = ranks
        return ranks

    # ------------------------------------------------------------------ rank 0 -> followers
    def announce(self, name: str, **kwargs: Any) -> None:
        """Rank 0: tell the followers to make call `name` with `kwargs` (no-op on one rank or a follower)."""
        if self.many and self.leader:
            assert not self.closed, f"announce({name!r}) after the ranks were closed"
            dist.broadcast_object_list([(name, kwargs)], src=0, group=self.group)

    def receive(self) -> tuple[str, dict[str, Any]]:
        """A follower: wait for rank 0's next call."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def stop(self) -> None:
        """Rank 0: release the followers (their `follow` returns), then close the process groups with them. Once."""
        if self.closed:
            return
        self.announce(STOP)
        self.close()

    def close(self) -> None:
        """Every rank, at a clean end: wait for the others on the command group, then destroy every process group
        (torch's own advice for a normal exit). Left to the interpreter's teardown, gloo's worker threads made a
        rank abort after a run that had succeeded ("terminate called without an active exception", pytorch#190489;
        7 of 15 two-rank launches here, and once in CI). Only at a clean end: after a failure the other ranks may
        be inside a collective that would never finish, and the launcher stops them. One rank launched by torchrun
        has a group too (accelerate makes a gloo group of one): destroyed alike. Idempotent. Called by `stop`
        (rank 0, after STOP released the followers) and by `follow` (at STOP): rank 0 calling it without `stop`
        would wait in the barrier for followers still waiting for a command."""
        global _CURRENT
        if self.closed:
            return
        self.closed = True
        if self.many:
            dist.barrier(group=self.group)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.group = None
        if _CURRENT is self:
            _CURRENT = None

    # ------------------------------------------------------------------ data
    def scatter(self, parts: Sequence[Any] | None) -> Any:
        """Rank 0 passes one part per rank and gets its own; the followers pass None and get theirs."""
        if not self.many:
            assert parts is not None and len(parts) == 1
            return parts[0]
        out: list[Any] = [None]
        dist.scatter_object_list(out, list(parts) if self.leader else None, src=0, group=self.group)
        return out[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None on the followers)."""
        if not self.many:
            return [obj]
        out: list[Any] | None = [None] * self.size if self.leader else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum of each value over the ranks (the same keys on every rank, in any order), on every rank."""
        if not self.many:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return dict(zip(keys, t.tolist(), strict=True))


def token_shares(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices of the items (of the given token lengths) for each of `size` ranks, balanced by tokens: longest
    first, each to the rank with the fewest tokens so far (ties: fewer items, then the lower rank). Within a share,
    indices are in ascending order of length (micro-batches of similar length pad less)."""
    assert size >= 1, size
    shares: list[list[int]] = [[] for _ in range(size)]
    load = [0] * size
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(size), key=lambda r: (load[r], len(shares[r]), r))
        shares[r].append(i)
        load[r] += lengths[i]
    return [sorted(s, key=lambda i: (lengths[i], i)) for s in shares]


def balanced_shares(lengths: Sequence[int], size: int, micro_batch_size: int) -> tuple[list[list[int]], int]:
    """`token_shares` and the number of micro-batches of `micro_batch_size` every rank runs: the most any share
    needs (the others pad with blank ones)."""
    shares = token_shares(lengths, size)
    return shares, max(micro_batches(len(sh), micro_batch_size) for sh in shares)


def micro_batches(count: int, micro_batch_size: int) -> int:
    """Micro-batches of at most `micro_batch_size` for `count` items (0 for none)."""
    return -(-count // micro_batch_size)


def pack_micro_batches(lengths: Sequence[int], share: Sequence[int], rows: int, tokens: int = 0) -> list[list[int]]:
    """One rank's share (indices into `lengths`, in ascending order of length, as `token_shares` gives them) cut into
    micro-batches, in order: at most `rows` items each and, when `tokens` > 0, at most `tokens` padded tokens
    (items x the longest item: what a right-padded forward computes). An item longer than `tokens` makes a
    micro-batch of its own."""
    assert rows >= 1 and tokens >= 0, (rows, tokens)
    out: list[list[int]] = []
    cur: list[int] = []
    for i in share:
        longest = max([lengths[j] for j in cur] + [lengths[i]])
        if cur and (len(cur) >= rows or (tokens and (len(cur) + 1) * longest > tokens)):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def micro_batch_plan(
    lengths: Sequence[int], size: int, rows: int, tokens: int = 0
) -> tuple[list[list[list[int]]], int]:
    """For each of `size` ranks, its micro-batches (`pack_micro_batches` of its `token_shares` share), and the number
    every rank runs: the most any rank has (the others pad with blank ones, so every rank joins every gradient
    reduction). tokens = 0: micro-batches of `rows` items, as `balanced_shares`."""
    plan = [pack_micro_batches(lengths, sh, rows, tokens) for sh in token_shares(lengths, size)]
    return plan, max((len(p) for p in plan), default=0)


def follow(ranks: Ranks) -> None:
    """A follower's life: build the policy rank 0 builds, join its collective calls, return at `stop`."""
    from trainer.learner.policy import Policy  # imports torch models: only once the process knows it follows

    policy: Policy | None = None
    while True:
        name, kwargs = ranks.receive()
        if name == STOP:
            log.info("released by rank 0", rank=ranks.rank)
            ranks.close()
            return
        if name == "policy":
            policy = None  # the previous one (the SFT warm start's) is freed first
            policy = Policy(**kwargs, ranks=ranks)
            continue
        assert policy is not None, f"rank {ranks.rank}: call {name!r} before any policy"
        getattr(policy, name)(**kwargs)

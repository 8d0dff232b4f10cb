"""The CPU engine's side of a weight-update process group: joining it as SGLang does, and receiving one bucket.

SGLang 0.5.23 joins with `sglang.srt.utils.common.init_custom_process_group`; the trainer's rank 0
(`trainer.engines.weight_sync`) goes through the same torch function SGLang calls there, `_new_process_group_helper`. The
store keys must be the same on every rank, so `WeightGroup.join` builds its group with the same layering:
1. `torch.distributed.rendezvous("tcp://master_address:master_port", rank, world_size)`: a TCPStore that rank 0
   serves (its constructor waits until all `world_size` ranks have connected);
2. `PrefixStore(group_name, store)` (SGLang's own prefix);
3. `PrefixStore(f"{group_name}/", ...)` and `PrefixStore(f"{device}/", ...)`, device being the first one torch maps
   the backend to (`BackendConfig`; for gloo "cpu", and torch registers that one backend for every device);
4. `ProcessGroupGloo(store, rank, world_size, timeout)`, then `_set_sequence_number_for_group()` (rank 0 writes a
   sequence number into the store, the other ranks read it).
Why not call torch's helper here too: it registers the group in torch's process-wide registry under `group_name`,
and a second group of the same name in one process (the tests run the trainer and the engines in one process)
raises. Nothing here touches that registry; only the torch backend object is kept. Not mirrored: torch's debug
wrapper (TORCH_DISTRIBUTED_DEBUG=DETAIL), which adds store traffic of its own; leave that variable unset.

Gloo only, tensors received on CPU: that is what this engine joins with (an NCCL group needs CUDA tensors on every
rank; SGLang on GPUs is the engine for that).

Threads. `join` and `receive` block until every rank takes part (up to `timeout`), so the app runs them on a thread
of their own, never on the event loop or on the model's thread; the received tensors are new buffers, and copying
them into the model is the model thread's job (`Engine.load_named_tensors`).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, BackendConfig, PrefixStore

BACKENDS = ("gloo",)


def tcp_init_method(host: str, port: int) -> str:
    """torch's `tcp://` rendezvous address; an IPv6 host goes in brackets (as SGLang's `NetworkAddress.to_tcp`)."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def torch_dtype(name: str) -> torch.dtype:
    """ "bfloat16" -> torch.bfloat16 (the names SGLang resolves with `getattr(torch, name)`); ValueError otherwise."""
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype name (e.g. 'bfloat16', 'float32')")
    return dtype


@dataclass
class WeightGroup:
    """This engine's membership of one weight-update group (one torch gloo backend)."""

    name: str
    rank: int
    world_size: int
    timeout_s: float
    _pg: Any  # torch.distributed.ProcessGroupGloo

    @classmethod
    def join(
        cls,
        *,
        master_address: str,
        master_port: int,
        rank: int,
        world_size: int,
        group_name: str,
        backend: str,
        timeout_s: float,
    ) -> WeightGroup:
        """Join as `rank`; blocks until every rank has joined or `timeout_s` passes (then torch raises)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: this engine joins weight groups over {BACKENDS} only")
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(
            dist.rendezvous(tcp_init_method(master_address, master_port), rank, world_size, timeout=timeout)
        )
        store.set_timeout(timeout)
        device = next(iter(BackendConfig(Backend(backend)).get_device_backend_map()))
        prefixed = PrefixStore(f"{device}/", PrefixStore(f"{group_name}/", PrefixStore(group_name, store)))
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout=timeout)
        pg._set_sequence_number_for_group()
        return cls(group_name, rank, world_size, timeout_s, pg)

    def receive(self, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> list[tuple[str, torch.Tensor]]:
        """Receive one tensor per (name, dtype, shape) by broadcast from rank 0, in list order (SGLang posts them
        all at once and then waits, as here). Raises on a bad dtype or shape before anything is received, and
        whatever torch raises (a timeout, a peer gone) after."""
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"{len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes: need one of each")
        buffers = []
        for name, dt, shape in zip(names, dtypes, shapes, strict=True):
            if any(type(d) is not int or d < 0 for d in shape):
                raise ValueError(f"{name}: shape {shape} is not a list of non-negative ints")
            buffers.append((name, torch.empty(shape, dtype=torch_dtype(dt))))
        works = []
        for _, t in buffers:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            opts.rootTensor = 0
            works.append(self._pg.broadcast([t], opts))
        for w in works:
            w.wait()
        return buffers

    def close(self) -> None:
        """Drop the backend (its sockets close when the last reference goes; a receive still blocked in another
        thread keeps one until torch's timeout ends it)."""
        self._pg = None

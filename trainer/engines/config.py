"""The engines' config section (`[engine]`), composed by `trainer.config.TrainConfig` on top."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import tyro

WEIGHT_SYNC = ("disk", "group")


@dataclass
class EngineConfig:
    type: Annotated[str, tyro.conf.arg(aliases=("--engine",))] = "cpu"
    """What to launch when `urls` is empty: "cpu", our CPU engine (`trace-engine serve`), or "sglang". ("url" is
    accepted for configs that attach: it then requires `urls`.)"""
    urls: Annotated[list[str], tyro.conf.arg(aliases=("--engine-url",))] = field(default_factory=list)
    """Engine base URLs to attach to instead of launching (repeatable); several = trees spread by load, sticky per
    tree."""
    num_servers: int = 1
    """Engines to launch (types cpu/sglang), on consecutive ports from `port`."""
    port: int = 0
    """First port for launched engines (0 = free ports)."""
    extra_args: list[str] = field(default_factory=list)
    """Extra command-line arguments for launched engines (e.g. ["--mem-fraction-static", "0.7"])."""
    gpus: list[int] = field(default_factory=list)
    """Physical GPU ids for the launched engines, split evenly among `num_servers` in order (server i gets the i-th
    slice as its CUDA_VISIBLE_DEVICES, so SGLang's --base-gpu-id stays 0; give a server as many as its --tp). [] =
    every server sees the devices the trainer sees. They must not be GPUs a training rank uses (unless `colocate`): e.g.
    8 GPUs, 6 training ranks (accelerate's gpu_ids 0-5) and engines on [6, 7]. A run that trains on GPUs and launches
    a CUDA engine (SGLang) with no engine.gpus is refused unless `colocate`."""
    colocate: bool = False
    """Let launched CUDA engines share GPUs with the training ranks: engine.gpus may name a training GPU, and with
    engine.gpus empty a server sees the trainer's devices (GPU 0, beside rank 0). For one-GPU work only (then give
    SGLang a `--mem-fraction-static` that leaves the policy room); without it such a run is refused at start."""
    max_batch: int = 64
    """CPU engine: sequences decoded together."""
    startup_timeout_s: float = 600.0
    weight_sync: str = "disk"
    """How new weights reach the engines after a step: "disk" (save a safetensors folder, each engine loads it with
    /update_weights_from_disk; needs a filesystem the engines share) or "group" (`trainer.engines.weight_sync`: a torch
    process group with the trainer as rank 0, gloo on CPU and nccl on GPUs, weights broadcast in buckets through
    /update_weights_from_distributed; needs the engines to reach the trainer's address over TCP)."""
    sync_address: str = "127.0.0.1"
    """weight_sync "group": the address of this machine (rank 0) that the engines connect to for the group."""
    sync_bucket_mb: int = 512
    """weight_sync "group": most MiB of weights per /update_weights_from_distributed call (a bigger tensor goes
    alone). Each engine allocates a bucket's receive buffers at once, so this bounds that extra memory."""

"""`trace-engine serve --model DIR ...`: run the CPU development engine (SGLang's /generate subset) over HTTP.

Thin by design: the command line (the project's one config mechanism, `shared/config.py`: `--config FILE.toml`,
then flags; `--help` lists every field) -> `ServeConfig` -> `EngineConfig`/`ServerConfig` -> `init_app` ->
`web.run_app`. The defaults serve the tiny model on a 2-core machine; `--device cuda --dtype bfloat16` runs the
same engine on a GPU when SGLang is not at hand.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro
from aiohttp import web

from engine.app import ServerConfig, init_app
from engine.engine import DTYPES, EngineConfig
from shared.config import parse_config
from shared.logging import setup_logging


def default_threads() -> int:
    """Half the cores, at least one, and at most $TRACE_CPU_SHARE when that is set (a process given a share of the
    cores, as `bench/compare_allocators.py --jobs` gives each run, passes it on to its engine; not $OMP_NUM_THREADS,
    which torchrun sets to 1 for every rank). The engine shares its machine with the trainer and the env server; with
    more OpenMP threads than free cores torch's threads spin-wait, and decode was measured 5-10x slower on the 2-core
    dev machines under load with 2 threads than with 1."""
    half = max(1, (os.cpu_count() or 2) // 2)
    share = os.environ.get("TRACE_CPU_SHARE", "")
    return min(half, int(share)) if share.isdigit() and int(share) >= 1 else half


@dataclass
class ServeConfig:
    """`trace-engine serve`'s config: the engine (EngineConfig's fields) and how it is served."""

    model: Path | None = None
    """Model folder (config.json + safetensors + tokenizer). Required."""
    host: str = "127.0.0.1"
    port: int = 30000
    """SGLang's default port."""
    max_batch: int = 32
    """Most sequences decoding at once."""
    cache_tokens: int = 131_072
    """Prefix-cache capacity in tokens."""
    prefix_cache: Annotated[bool, tyro.conf.arg(aliases=("--cache",))] = True
    """False (`--no-prefix-cache`, or `--no-cache`): every prompt is prefilled from scratch (benchmarks)."""
    device: str = "cpu"
    """torch device, e.g. cpu or cuda."""
    dtype: str | None = None
    """One of float32, bfloat16, float16; default float32 on cpu, bfloat16 on cuda."""
    seed: int = 0
    """Sampling generator seed."""
    threads: int | None = None
    """torch threads; default half the cores, at least 1 (0 = torch's default: all cores)."""
    batch_window_ms: float = 3.0
    """Idle engine: wait this long to batch arrivals."""
    queue_size: int = 1024
    """Bound of the pending-request queue."""
    return_original_logprob: bool = False
    """Logprobs of the untempered distribution (SGLANG_RETURN_ORIGINAL_LOGPROB=1)."""
    log_level: str = "info"

    def validate(self) -> ServeConfig:
        if self.model is None:
            raise ValueError("--model DIR is required (a save_pretrained folder)")
        if not (self.model / "config.json").is_file():
            raise ValueError(f"--model {self.model}: no config.json there")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: use one of {sorted(DTYPES)}")
        return self

    def server_config(self) -> ServerConfig:
        assert self.model is not None, "validate() first"
        engine = EngineConfig(
            model_path=self.model,
            device=self.device,
            dtype=self.dtype or ("float32" if self.device == "cpu" else "bfloat16"),
            max_batch=self.max_batch,
            cache_tokens=self.cache_tokens,
            enable_prefix_cache=self.prefix_cache,
            seed=self.seed,
            return_original_logprob=self.return_original_logprob,
            threads=default_threads() if self.threads is None else self.threads,
        )
        return ServerConfig(engine=engine, queue_size=self.queue_size, batch_window_ms=self.batch_window_ms)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        print("usage: trace-engine serve --model DIR [...]  (`trace-engine serve --help` lists every field)")
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        desc = "TRACE's CPU development engine (not SGLang)"
        cfg = parse_config(ServeConfig, argv[1:], prog="trace-engine serve", description=desc)
        server = cfg.server_config()
    except SystemExit as e:
        return int(e.code or 0)
    except ValueError as e:  # EngineConfig's own checks
        print(f"trace-engine serve: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    web.run_app(init_app(server), host=cfg.host, port=cfg.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

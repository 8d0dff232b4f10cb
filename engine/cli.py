"""`trace-engine serve --model DIR ...`: run the CPU development engine (SGLang's /generate subset) over HTTP.

Thin by design: flags -> `EngineConfig`/`ServerConfig` -> `init_app` -> `web.run_app`. The defaults serve the tiny
model on a 2-core machine; `--device cuda --dtype bfloat16` runs the same engine on a GPU when SGLang is not at hand.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from aiohttp import web

from engine.app import ServerConfig, init_app
from engine.engine import DTYPES, EngineConfig
from shared.logging import setup_logging


def default_threads() -> int:
    """Half the cores, at least one. The engine shares its machine with the trainer and the env server; with more
    OpenMP threads than free cores torch's threads spin-wait, and decode was measured 5-10x slower on the 2-core
    dev machines under load with 2 threads than with 1."""
    return max(1, (os.cpu_count() or 2) // 2)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trace-engine", description="TRACE's CPU development engine (not SGLang)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve a save_pretrained model folder over SGLang's /generate API subset")
    s.add_argument("--model", type=Path, required=True, help="model folder (config.json + safetensors + tokenizer)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=30000, help="SGLang's default port")
    s.add_argument("--max-batch", type=int, default=32, help="most sequences decoding at once")
    s.add_argument("--cache-tokens", type=int, default=131_072, help="prefix-cache capacity in tokens")
    s.add_argument("--no-cache", action="store_true", help="disable the prefix cache (benchmarks)")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    s.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    s.add_argument("--seed", type=int, default=0, help="sampling generator seed")
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads; default half the cores, at least 1 (0 = torch's default: all cores)",
    )
    s.add_argument("--batch-window-ms", type=float, default=3.0, help="idle engine: wait this long to batch arrivals")
    s.add_argument("--queue-size", type=int, default=1024, help="bound of the pending-request queue")
    s.add_argument(
        "--return-original-logprob",
        action="store_true",
        help="logprobs of the untempered distribution (SGLANG_RETURN_ORIGINAL_LOGPROB=1)",
    )
    s.add_argument("--log-level", default="info")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    engine = EngineConfig(
        model_path=args.model,
        device=args.device,
        dtype=dtype,
        max_batch=args.max_batch,
        cache_tokens=args.cache_tokens,
        enable_prefix_cache=not args.no_cache,
        seed=args.seed,
        return_original_logprob=args.return_original_logprob,
        threads=default_threads() if args.threads is None else args.threads,
    )
    cfg = ServerConfig(engine=engine, queue_size=args.queue_size, batch_window_ms=args.batch_window_ms)
    web.run_app(init_app(cfg), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

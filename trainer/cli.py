"""`trace-train`: the main job, and `eval`.

    trace-train [--config FILE] [--steps N] [--output-dir DIR] [--allocator NAME] [--resume]
                [--model PATH] [--engine cpu|sglang] [--engine-url URL ...] [--env-url URL]
                [--set section.field=value ...]
    trace-train eval --model DIR [--split dev] [--limit N] [--config FILE] [--env-url URL] ...

With no arguments it is the embedded CPU demo: builds the tiny model, starts the env server and the
CPU engine as child processes, SFT warm start (cached), then TRACE RL with metrics in runs/cpu-demo.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from shared.logging import setup_logging


def _parser(eval_mode: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trace-train eval" if eval_mode else "trace-train",
        description="Evaluate a checkpoint through the agent loop" if eval_mode else "TRACE agentic RL training",
    )
    p.add_argument("--config", help="TOML config (sections of trainer/config.py)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    p.add_argument("--model", help="model folder (a Qwen3 checkpoint, or one of ours)")
    p.add_argument("--engine", choices=["cpu", "sglang"], help="launch this engine type")
    p.add_argument("--engine-url", action="append", help="attach to a running engine (repeatable)")
    p.add_argument("--env-url", help="attach to a running env server")
    p.add_argument("--log-level", default="warning")
    if eval_mode:
        p.add_argument("--split", help="split to evaluate (default: env.eval_split)")
        p.add_argument("--limit", type=int, default=200, help="questions (from the split's start)")
        p.add_argument("--out", help="write the result as JSON here")
    else:
        p.add_argument("--steps", type=int)
        p.add_argument("--output-dir")
        p.add_argument("--name", help="run name (outputs under runs/<name>)")
        p.add_argument("--allocator", help="trace, uniform, root-only or random-node")
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    return p


def _config(args: argparse.Namespace):  # -> TrainConfig
    from trainer.config import load_train_config

    sets = list(args.set)
    for flag, key in (
        ("steps", "run.steps"),
        ("name", "run.name"),
        ("output_dir", "run.output_dir"),
        ("allocator", "allocation.type"),
        ("engine", "engine.type"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")
    if args.engine_url:
        sets += ['engine.type="url"', f"engine.urls={json.dumps(args.engine_url)}"]
    if args.env_url:
        sets.append(f"env.url={json.dumps(args.env_url)}")
    if args.model:
        sets.append(f"model.path={json.dumps(str(Path(args.model).resolve()))}")
    return load_train_config(args.config, sets)


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    eval_mode = bool(argv) and argv[0] == "eval"
    args = _parser(eval_mode).parse_args(argv[1:] if eval_mode else argv)
    setup_logging(args.log_level)
    try:
        cfg = _config(args)
    except (ValueError, AssertionError, OSError) as e:
        print(f"trace-train: {e}", file=sys.stderr)
        return 2
    if eval_mode:
        from trainer.evaluate import evaluate_checkpoint

        if cfg.model.path is None:
            print("trace-train eval: --model DIR is required", file=sys.stderr)
            return 2
        result = asyncio.run(evaluate_checkpoint(cfg, split=args.split, limit=args.limit))
        print(json.dumps(result, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        return 0
    from trainer.loop import train

    signal.signal(signal.SIGTERM, _sigterm)  # clean up child processes on SIGTERM as on Ctrl-C
    try:
        out = asyncio.run(train(cfg, resume=args.resume))
    except KeyboardInterrupt:
        print("trace-train: interrupted; child processes stopped", file=sys.stderr)
        return 130
    print(f"done: metrics in {out / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

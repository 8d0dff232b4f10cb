"""`trace-train`: the main job, and `eval`.

    trace-train [--config FILE] [--steps N] [--output-dir DIR] [--allocator NAME] [--resume]
                [--model PATH] [--engine cpu|sglang] [--engine-url URL ...] [--env-url URL ...]
                [--section.field VALUE ...] [--set section.field=value ...]
    trace-train eval --model DIR [--split dev] [--limit N] [--out FILE] [--config FILE] [--env-url URL ...] ...

With no arguments it is the embedded CPU demo: builds the tiny model, starts the env server and the
CPU engine as child processes, SFT warm start (cached), then TRACE RL with metrics in runs/cpu-demo.
`--help` lists every config field (trainer/config.py) with its documentation.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from shared.config import parse_args
from shared.logging import setup_logging
from trainer.config import ENV_VARS, RunError, TrainConfig, check_local_paths
from trainer.learner.config import uses_cpu


@dataclass
class _Args:
    cfg: Annotated[TrainConfig, tyro.conf.arg(name="")]
    config: str | None = None
    """TOML config (sections of trainer/config.py); everything after it overrides it."""
    set: list[str] = field(default_factory=list)
    """`section.field=value` overrides in TOML syntax (repeatable), applied before the other flags."""


@dataclass
class TrainArgs(_Args):
    resume: bool = False
    """Continue from the latest checkpoint in the output dir."""


@dataclass
class EvalArgs(_Args):
    split: str | None = None
    """Split to evaluate (default: env.eval_split)."""
    limit: int = 200
    """Questions, from the split's start."""
    out: str | None = None
    """Write the result as JSON here too."""


def parse(argv: list[str], *, eval_mode: bool = False) -> TrainArgs | EvalArgs:
    """The parsed command line (config built and validated); exits 2 with a message on bad input."""
    return parse_args(
        EvalArgs if eval_mode else TrainArgs,
        argv,
        prog="trace-train eval" if eval_mode else "trace-train",
        description="Evaluate a checkpoint through the agent loop (greedy)" if eval_mode else "TRACE agentic RL",
        env_vars=ENV_VARS,
    )


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _many_ranks_refused(cfg: TrainConfig) -> str | None:
    """Why this config cannot train on several ranks (None: it can)."""
    from trainer.learner.distributed import fsdp_requested

    if fsdp_requested() and cfg.optim.kl_coef > 0:
        return (
            f"optim.kl_coef={cfg.optim.kl_coef} under FSDP: the KL reference is not sharded yet; set optim.kl_coef = 0 "
            "or train with DDP (configs/accelerate/ddp.yaml)"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    eval_mode = bool(argv) and argv[0] == "eval"
    try:
        args = parse(argv[1:] if eval_mode else argv, eval_mode=eval_mode)
    except SystemExit as e:
        return int(e.code or 0)
    cfg = args.cfg
    setup_logging(cfg.run.log_level)
    prog = "trace-train eval" if eval_mode else "trace-train"
    try:  # before anything starts: a model folder that is not one fails here, not after the env server came up
        check_local_paths(cfg)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if isinstance(args, EvalArgs):
        from trainer.evaluate import evaluate_checkpoint
        from trainer.learner.distributed import launched_ranks

        if launched_ranks() > 1:
            print(
                "trace-train eval: runs in one process; launch it without torchrun / accelerate launch", file=sys.stderr
            )
            return 2
        if cfg.model.path is None:
            print("trace-train eval: --model DIR is required", file=sys.stderr)
            return 2
        if args.limit < 1:
            print(f"trace-train eval: --limit must be >= 1, got {args.limit}", file=sys.stderr)
            return 2
        try:
            result = asyncio.run(evaluate_checkpoint(cfg, split=args.split, limit=args.limit))
        except RunError as e:
            print(f"trace-train eval: {e}", file=sys.stderr)
            return 2
        print(json.dumps(result, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        return 0
    from trainer.learner.distributed import Ranks, follow, launched_ranks

    if launched_ranks() > 1 and (why := _many_ranks_refused(cfg)) is not None:
        print(f"trace-train: launched as {launched_ranks()} ranks: {why}", file=sys.stderr)
        return 2
    from trainer.services import check_engine_placement

    try:  # every rank: all of them exit at once, none waits for a rank 0 that refused
        check_engine_placement(cfg)
    except ValueError as e:
        print(f"trace-train: {e}", file=sys.stderr)
        return 2
    ranks = Ranks.start(cpu=uses_cpu(cfg.model))
    if not ranks.leader:  # rank 0 runs the trainer; this rank joins its policy's collective calls
        follow(ranks)
        return 0
    from trainer.loop import train

    signal.signal(signal.SIGTERM, _sigterm)  # clean up child processes on SIGTERM as on Ctrl-C
    try:
        out = asyncio.run(train(cfg, resume=args.resume))
    except RunError as e:  # bad input only the run could find (a server that answers nothing, no checkpoint)
        print(f"trace-train: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trace-train: interrupted; child processes stopped", file=sys.stderr)
        return 130
    ranks.stop()  # only after a clean run: a failed rank 0 exits non-zero and the launcher stops the others
    print(f"done: metrics in {out / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`trace-env`: serve the env server, build a search index, run a demo. (The synthetic world is written by
`trace-world`, tools/synthetic.py; the built-in one ships in env_server/data/synthetic.)

    trace-env serve [--config FILE.toml] [--host H] [--port P] [--data NAME=FILE ...] [--corpus FILE]
                    [--index-dir DIR] [--retriever-url URL] [--auth-token T] [--max-episodes N]
                    [--episode-ttl S] [--max-turns N] [--topk K] ...
    trace-env index --corpus FILE --index-dir DIR
    trace-env demo

Entry points stay thin: parsing here, behaviour in `env_server.app` and friends.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

from env_server.config import ServerConfig
from shared.config import parse_config
from shared.logging import setup_logging

USAGE = """usage: trace-env {serve,index,demo} ...

  serve   run the HTTP server (`trace-env serve --help` lists every config field)
  index   build the on-disk search index of a corpus jsonl: --corpus FILE --index-dir DIR
  demo    start a server on the synthetic world and play a scripted, branching episode
"""


@dataclass
class DemoConfig:
    """`trace-env demo`'s config: the server the scripted episode runs against."""

    port: int = 0
    """Port of the demo's own server on 127.0.0.1 (0: a free one)."""


@dataclass
class IndexConfig:
    """`trace-env index`'s config: which corpus to index where."""

    corpus: str = ""
    """Corpus jsonl (`{id, contents: "\\"Title\\"\\ntext"}`). Required."""
    index_dir: str = ""
    """Folder to write the on-disk index into. Required."""

    def validate(self) -> IndexConfig:
        missing = [f for f, v in (("--corpus", self.corpus), ("--index-dir", self.index_dir)) if not v]
        if missing:
            raise ValueError(f"the following arguments are required: {', '.join(missing)}")
        return self


CLOSE_GRACE_S = 1.0
"""After the drain, how long the runner waits for requests that are still being answered when it closes: those that
arrived in the drain's last moment (a 503 takes microseconds); the drain itself already waited for real work."""


GC_THRESHOLD = (20_000, 50, 100)
"""The server process's `gc.set_threshold` (Python's default: 700, 10, 10), set by `trace-env serve` once the
resources are loaded and frozen out of the collector (`gc.freeze`). A step allocates dozens of objects, nearly all
freed by reference counting (episode state holds no cycles), so the default gen-0 threshold ran a collection every
few steps, and full collections walked every live episode and snapshot: 6% of a search step's time with 20,000 live
episodes, 1% with these thresholds (measured in-process, 10,000 steps). Cyclic garbage lives a little longer."""


def tune_gc() -> None:
    """Freeze what is alive now (modules, the question sets, the index handles) and collect less often (GC_THRESHOLD).
    Process-wide: `trace-env serve` calls it, not the app, so embedding the app (tests, the trainer) changes nothing."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def serve(cfg: ServerConfig, ready: asyncio.Future[str] | None = None, *, own_process: bool = False) -> None:
    """Run until SIGINT/SIGTERM (or cancellation). On the signal, drain (`env_server.app.drain`): keep listening,
    answer new work and /health with 503 + Retry-After, and let in-flight requests finish, for at most
    `shutdown_timeout_s` (a second signal cuts it short); then close. `ready` gets the bound URL once listening.
    `own_process`: the process is this server's alone, so tune its garbage collector (`tune_gc`) once started."""
    from aiohttp import web

    from env_server.app import drain, init_app

    log = structlog.get_logger("env_server")
    app = init_app(cfg)
    runner = web.AppRunner(app, shutdown_timeout=CLOSE_GRACE_S, access_log=None)
    await runner.setup()
    if own_process:
        tune_gc()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    url = f"http://{cfg.host}:{runner.addresses[0][1]}"
    log.info("listening", url=url)
    print(f"TRACE env server listening on {url}", flush=True)
    if not cfg.data and not cfg.uses_synthetic:
        print(
            "no question sets (--data): episodes must bring their own question and answers "
            "(POST /v1/episodes {question, answers}); `--data NAME=FILE` serves a dataset",
            flush=True,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set_result(url)
    try:
        await stop.wait()
        hurry = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, hurry.set)
        await drain(app, cfg.shutdown_timeout_s, hurry)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else None
    if cmd not in ("serve", "index", "demo"):
        print(USAGE, end="", file=sys.stdout if cmd in ("-h", "--help") else sys.stderr)
        return 0 if cmd in ("-h", "--help") else 2
    if cmd == "serve":
        from env_server.config import parse_serve_args

        cfg = parse_serve_args(argv[1:])
        setup_logging(cfg.log_level)
        from env_server.retrieval.base import RetrieverError

        try:
            asyncio.run(serve(cfg, own_process=True))
        except (ValueError, OSError, RetrieverError) as e:  # at start-up: a bad data/corpus file or index, a busy port
            print(f"trace-env serve: {e}", file=sys.stderr)
            return 2
        return 0
    setup_logging("warning" if cmd == "demo" else "info")
    if cmd == "index":
        from env_server.retrieval.tantivy_index import build_index, read_corpus_jsonl

        desc = "Build the on-disk search index of a corpus jsonl."
        args = parse_config(IndexConfig, argv[1:], prog="trace-env index", description=desc)
        corpus = Path(args.corpus)
        if not corpus.is_file():
            print(f"trace-env index: no such corpus file {corpus}", file=sys.stderr)
            return 2
        try:
            corpus_id = build_index(read_corpus_jsonl(corpus), Path(args.index_dir), progress=True)
        except ValueError as e:
            print(f"trace-env index: {e}", file=sys.stderr)
            return 2
        print(f"index ready at {args.index_dir} (corpus_id {corpus_id})")
        return 0
    if cmd == "demo":
        from env_server.demo import run_demo

        desc = (
            "Start the env server on the synthetic world and play one scripted episode through HTTP, forked at turn 1."
        )
        demo = parse_config(DemoConfig, argv[1:], prog="trace-env demo", description=desc)
        return asyncio.run(run_demo(demo.port))
    raise AssertionError(cmd)


if __name__ == "__main__":
    sys.exit(main())

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

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import structlog

from env_server.config import ServerConfig
from shared.logging import setup_logging


def _kv(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (or NAME:SPLIT=PATH), got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trace-env", description="TRACE env server: forkable ReAct search/QA episodes")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the HTTP server")
    s.add_argument("--config", help="TOML file with ServerConfig fields (flags override it)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--data", type=_kv, action="append", metavar="NAME=FILE", help="question set (repeatable)")
    s.add_argument("--corpus", help="corpus jsonl to search (indexed on first use)")
    s.add_argument("--index-dir", help="on-disk index folder")
    s.add_argument("--retriever-url", help="external Search-R1-style /retrieve server instead of the local index")
    s.add_argument("--auth-token", help="bearer token (or env TRACE_AUTH_TOKEN)")
    s.add_argument("--max-episodes", type=int)
    s.add_argument("--max-snapshots", type=int)
    s.add_argument("--episode-ttl", type=float, dest="episode_ttl_s", help="idle seconds before an episode expires")
    s.add_argument("--max-turns", type=int)
    s.add_argument("--topk", type=int)
    s.add_argument("--max-topk", type=int)
    s.add_argument("--max-batch-ops", type=int)
    s.add_argument("--max-body-bytes", type=int)
    s.add_argument("--reward-metric", choices=["em", "f1", "cover_em"])
    s.add_argument("--prompt-template", help="user prompt with a {question} placeholder (default: Search-R1 style)")
    s.add_argument("--cache-dir")
    s.add_argument("--search-threads", type=int)
    s.add_argument("--shutdown-timeout", type=float, dest="shutdown_timeout_s")
    s.add_argument("--log-level")

    i = sub.add_parser("index", help="build the on-disk search index of a corpus jsonl")
    i.add_argument("--corpus", required=True)
    i.add_argument("--index-dir", required=True)

    sub.add_parser("demo", help="start a server on the synthetic world and play a scripted, branching episode")
    return p


async def serve(cfg: ServerConfig, ready: asyncio.Future[str] | None = None) -> None:
    """Run until SIGINT/SIGTERM (or cancellation); then stop accepting, answer 503 to new work and let
    in-flight requests finish. `ready` gets the bound URL once the server listens."""
    from aiohttp import web

    from env_server.app import init_app

    log = structlog.get_logger("env_server")
    runner = web.AppRunner(init_app(cfg), shutdown_timeout=cfg.shutdown_timeout_s, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    url = f"http://{cfg.host}:{runner.addresses[0][1]}"
    log.info("listening", url=url)
    print(f"TRACE env server listening on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set_result(url)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        log.info("draining")
        await runner.cleanup()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "serve":
        from env_server.config import load_config

        overrides = {k: v for k, v in vars(args).items() if k not in ("cmd", "config")}
        overrides["data"] = dict(args.data or [])
        try:
            cfg = load_config(args.config, **overrides)
        except (ValueError, OSError) as e:
            print(f"trace-env serve: {e}", file=sys.stderr)
            return 2
        setup_logging(cfg.log_level)
        from env_server.retrieval.base import RetrieverError

        try:
            asyncio.run(serve(cfg))
        except (ValueError, OSError, RetrieverError) as e:  # at start-up: a bad data/corpus file or index, a busy port
            print(f"trace-env serve: {e}", file=sys.stderr)
            return 2
        return 0
    setup_logging("warning" if args.cmd == "demo" else "info")
    if args.cmd == "index":
        from env_server.retrieval.tantivy_index import build_index, read_corpus_jsonl

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
    if args.cmd == "demo":
        from env_server.demo import run_demo

        return asyncio.run(run_demo())
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())

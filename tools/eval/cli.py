"""`trace-eval`: evaluate an agent on a dataset split served by a TRACE env server.

    trace-eval --env-url URL --agent NAME --dataset NAME --split NAME --out FILE.jsonl
               [--limit N] [--concurrency 16] [--max-turns N] [--env-token T]
               [--base-url URL] [--model NAME] [--api-key-env NAME] [--temperature T] [--max-tokens N]
               [--request-timeout S] [--agent-retries N] [--env-retries N] [--retry-errors] [--no-progress]

Writes one jsonl row per question to FILE.jsonl (resuming: questions already there are skipped), then
FILE.summary.md and FILE.summary.csv, and prints the summary table.

Exit codes: 0 the run completed (even if some questions have errors: they are in the file, with the error);
2 bad arguments or an unusable output file (argparse's convention); 3 the env server is unreachable or refuses
us (nothing is lost: rerun to resume); 130 interrupted (likewise).

Entry points stay thin: parsing here, behaviour in `tools.eval.runner`, `tools.eval.agents`, `tools.eval.report`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from tools.eval.agents import AGENTS, AgentConfig
from tools.eval.report import write_summary
from tools.eval.runner import EnvUnavailable, EvalConfig, UsageError, read_rows, run_eval

EXIT_OK, EXIT_USAGE, EXIT_ENV, EXIT_INTERRUPTED = 0, 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trace-eval",
        description="Run an agent over a dataset split served by a TRACE env server; one jsonl row per question.",
    )
    p.add_argument(
        "--env-url",
        default=os.environ.get("TRACE_ENV_URL"),
        required="TRACE_ENV_URL" not in os.environ,
        help="env server base URL, e.g. http://127.0.0.1:8000 (default: $TRACE_ENV_URL)",
    )
    p.add_argument("--agent", required=True, choices=list(AGENTS), help="which agent plays the episodes")
    p.add_argument("--dataset", required=True, help="dataset name as the server's /v1/info lists it")
    p.add_argument("--split", required=True, help="split of that dataset (train, dev, test, ...)")
    p.add_argument("--out", required=True, type=Path, help="results jsonl (appended to; existing rows are skipped)")
    p.add_argument("--limit", type=int, help="only the first N questions of the split")
    p.add_argument("--concurrency", type=int, default=16, help="questions in flight at once (default 16)")
    p.add_argument("--max-turns", type=int, help="turns per episode (default: the server's)")
    p.add_argument(
        "--env-token", default=os.environ.get("TRACE_AUTH_TOKEN"), help="bearer token (default: $TRACE_AUTH_TOKEN)"
    )
    p.add_argument("--env-retries", type=int, default=3, help="retries of env calls that are safe to retry")
    p.add_argument("--env-timeout", type=float, default=60.0, help="seconds per env call (default 60)")
    p.add_argument("--retry-errors", action="store_true", help="run again the questions whose rows have an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    a = p.add_argument_group("model-backed agents (openai-tools, react-text, policy)")
    a.add_argument(
        "--base-url",
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:30000/v1; for policy: an engine's native URL",
    )
    a.add_argument("--model", help="model name the endpoint serves; for policy: the checkpoint folder")
    a.add_argument("--api-key-env", default="OPENAI_API_KEY", help="variable holding the API key (OPENAI_API_KEY)")
    a.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    a.add_argument("--max-tokens", type=int, default=512, help="tokens per model call (default 512)")
    a.add_argument("--request-timeout", type=float, default=120.0, help="seconds per model call (default 120)")
    a.add_argument("--agent-retries", type=int, default=2, help="retries per model call (default 2)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = EvalConfig(
        env_url=args.env_url,
        agent=args.agent,
        dataset=args.dataset,
        split=args.split,
        out=args.out,
        limit=args.limit,
        concurrency=args.concurrency,
        max_turns=args.max_turns,
        env_token=args.env_token,
        env_retries=args.env_retries,
        env_timeout_s=args.env_timeout,
        retry_errors=args.retry_errors,
        progress=not args.no_progress,
        agent_cfg=AgentConfig(
            base_url=args.base_url,
            model=args.model,
            api_key_env=args.api_key_env,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            request_timeout_s=args.request_timeout,
            retries=args.agent_retries,
        ),
    )
    try:
        stats = asyncio.run(run_eval(cfg))
    except UsageError as e:
        print(f"trace-eval: {e}", file=sys.stderr)
        return EXIT_USAGE
    except EnvUnavailable as e:
        print(f"trace-eval: {e}", file=sys.stderr)
        return EXIT_ENV
    except KeyboardInterrupt:
        print(f"trace-eval: interrupted; finished questions are in {cfg.out}; rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    table, md_path, csv_path = write_summary(read_rows(cfg.out), cfg.out)
    print(table, end="")
    print(
        f"\n{stats.written} questions run ({stats.errors} with errors), {stats.skipped} already done, "
        f"{stats.total} in all.\nresults: {cfg.out}\nsummary: {md_path}, {csv_path}"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""`trace-eval`: evaluate an agent on a dataset split served by a TRACE env server.

    trace-eval --env-url URL [--env-url URL ...] --agent NAME --dataset NAME --split NAME --out FILE.jsonl
               [--limit N] [--concurrency 16] [--max-turns N] [--env-token T]
               [--base-url URL] [--model NAME] [--api-key-env NAME] [--temperature T] [--max-tokens N]
               [--request-timeout S] [--agent-retries N] [--env-retries N] [--retry-errors] [--no-progress]

Writes one jsonl row per question to FILE.jsonl (resuming: questions already there are skipped), then
FILE.summary.md and FILE.summary.csv, and prints the summary table.

Exit codes: 0 the run completed (even if some questions have errors: they are in the file, with the error);
2 bad arguments or an unusable output file (argparse's convention); 3 the env server is unreachable or refuses
us (nothing is lost: rerun to resume); 130 interrupted (likewise).

Flags, `--config FILE.toml` and environment variables ($TRACE_ENV_URL, $TRACE_ENV_TOKEN) go through the project's
one config mechanism (`shared/config.py`); `trace-eval --help` lists every field. Entry points stay thin: parsing here, behaviour in `tools.eval.runner`, `tools.eval.agents`, `tools.eval.report`.
"""

from __future__ import annotations

import asyncio
import sys

from shared.config import parse_config
from tools.eval.report import write_summary
from tools.eval.runner import EnvUnavailable, EvalConfig, UsageError, read_rows, run_eval

EXIT_OK, EXIT_USAGE, EXIT_ENV, EXIT_INTERRUPTED = 0, 2, 3, 130
ENV_VARS = {"TRACE_ENV_URL": "env_urls", "TRACE_ENV_TOKEN": "env_token", "TRACE_AUTH_TOKEN": "env_token"}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(
        EvalConfig,
        argv,
        prog="trace-eval",
        description="Run an agent over a dataset split served by a TRACE env server; one jsonl row per question.",
        env_vars=ENV_VARS,
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

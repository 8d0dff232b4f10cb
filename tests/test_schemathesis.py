"""schemathesis over `/openapi.json`, as an outside tester runs it (issue 14, item 6): the `schemathesis run` command
against real `trace-env serve` processes on loopback, once without a token and once with one required. Every
operation, both encodings (JSON and, through the hooks below, MessagePack), the examples, coverage, fuzzing and
stateful phases (the document's links lead from a created episode to its steps, forks and snapshots), a bounded
number of examples and a fixed seed. It must find no 5xx and no answer that the document does not describe, and
every body the document refuses must be refused (`negative_data_rejection`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import start_server_process, stop_process

from env_server.openapi import OPERATIONS

pytestmark = pytest.mark.timeout(120)

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
EXAMPLES = 10
"""Examples per operation and phase: ~1,300 requests and ~16 s per server on a 2-core machine."""
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
]
HOOKS = '''
"""MessagePack bodies for schemathesis (written by tests/test_schemathesis.py)."""
import msgpack
import schemathesis

INT_RANGE = (-(2**63), 2**64 - 1)


def _representable(value):
    """MessagePack has no integers past 64 bits: a generated one goes as the nearest float (still not an integer)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        return float(value)
    if isinstance(value, dict):
        return {k: _representable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_representable(v) for v in value]
    return value


@schemathesis.serializer("application/msgpack")
def to_msgpack(ctx, value):
    return msgpack.packb(_representable(value))


@schemathesis.deserializer("application/msgpack")
def from_msgpack(ctx, response):
    return msgpack.unpackb(response.content)
'''


@pytest.mark.parametrize("token", [None, "s3cret"], ids=["open", "token-required"])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    tmp_path: Path, env_cache_dir: Path, token: str | None
) -> None:
    """Issue 14 item 6: the OpenAPI document was looser than the server (no bounds on `n` or `topk`, no `oneOf` for
    the create and step bodies) and no test ran a schema-driven fuzzer. With a token required, schemathesis sends
    it, and also checks that calls without it are refused (`ignored_auth`)."""
    hooks = tmp_path / "msgpack_hooks.py"
    hooks.write_text(HOOKS)
    args = ["--log-level", "warning", "--max-episodes", "2000"] + (["--auth-token", token] if token else [])
    proc, url = start_server_process(args, env={"TRACE_CACHE_DIR": str(env_cache_dir)})
    report = tmp_path / "report.json"
    cmd = [
        str(SCHEMATHESIS),
        "run",
        f"{url}/openapi.json",
        "--include-path-regex",
        "^/",  # every operation: without a filter schemathesis leaves out the one serving the document
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        "14",
        "--workers",
        "1",
        "--checks",
        ",".join(CHECKS + (["ignored_auth"] if token else [])),
        "--request-timeout",
        "20",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    if token:
        cmd += ["--header", f"Authorization: Bearer {token}"]
    try:
        run = subprocess.run(
            cmd,
            cwd=tmp_path,  # its .schemathesis/ and .hypothesis/ folders go here, not into the repository
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(hooks)},
            capture_output=True,
            text=True,
            timeout=100,
        )
    finally:
        _, err = stop_process(proc)
    assert run.returncode == 0, f"schemathesis found problems:\n{run.stdout[-12000:]}\n{run.stderr[-3000:]}"
    summary = json.loads(report.read_text())
    assert summary["operations"]["tested"] == summary["operations"]["total"] == len(OPERATIONS), summary["operations"]
    assert summary["failures"] == [] and summary["errors"] == [], (summary["failures"], summary["errors"])
    assert summary["test_cases"]["generated"] > 500, summary["test_cases"]
    assert {name for name, p in summary["phases"].items() if p["status"] == "success"} >= {
        "coverage",
        "fuzzing",
        "stateful",
    }, summary["phases"]
    warnings = summary["warnings"]
    assert warnings["missing_deserializer"] == [], "MessagePack answers were not validated"
    # The old, looser document drew both: schema-valid bodies the server refused (POST /v1/episodes, .../step,
    # .../fork, /v1/snapshots, ...) and operations never reached past 404 (no links from create to the id routes).
    assert warnings["validation_mismatch"] == [], warnings["validation_mismatch"]
    assert warnings["missing_test_data"] == [], warnings["missing_test_data"]
    # No 500 can hide behind a documented status: the server logs each one as "unhandled error" with its traceback.
    # (aiohttp's own parser refuses schemathesis' NUL-in-a-header probe with a 400 and a logged traceback of its own.)
    assert proc.returncode == 0 and "unhandled error" not in err, err[-3000:]

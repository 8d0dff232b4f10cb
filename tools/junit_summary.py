"""Counts of a pytest JUnit XML report, for the opt-in test tiers (tools/sglang-cpu/run-tests,
tools/browser/run-tests): prints "passed failed errors skipped" (a skip or an xfail counts as skipped)."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def main(path: str) -> None:
    cases = list(ET.parse(path).getroot().iter("testcase"))
    count = lambda tag: sum(1 for c in cases if c.find(tag) is not None)  # noqa: E731
    clean = sum(1 for c in cases if all(c.find(t) is None for t in ("failure", "error", "skipped")))
    print(clean, count("failure"), count("error"), count("skipped"))


if __name__ == "__main__":
    main(sys.argv[1])

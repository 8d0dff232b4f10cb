"""The summary of a results file: one line per (dataset, split, hop count) plus an `all` line per split.

Conventions: EM, F1 and cover-EM are means over *all* n questions of the group; a question that errored or
was truncated counts as 0 (it was not answered), and `errors` says how many errored, so a dead endpoint shows
as errors rather than as a silently smaller n. Questions without a hop count (datasets without that metadata)
are grouped under hops `-`. Written as `FILE.summary.md` and `FILE.summary.csv` next to `FILE.jsonl`.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from tools.eval.runner import ResultRow


@dataclass(frozen=True)
class SummaryLine:
    dataset: str
    split: str
    hops: str  # "1", "2", ...; "-" when unknown; "all" for the whole split
    n: int
    em: float
    f1: float
    cover_em: float
    errors: int
    truncated: int
    mean_turns: float
    mean_searches: float


def summarize(rows: list[ResultRow]) -> list[SummaryLine]:
    """Group rows by (dataset, split, hops); each split's groups in hop order, then its `all` line."""
    groups: dict[tuple[str, str], dict[str, list[ResultRow]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r.dataset, r.split)]["-" if r.hops is None else str(r.hops)].append(r)
    lines: list[SummaryLine] = []
    for (dataset, split), by_hops in sorted(groups.items()):
        order = sorted(by_hops, key=lambda h: (h == "-", int(h) if h.isdigit() else 0))
        for hops in order:
            lines.append(_line(dataset, split, hops, by_hops[hops]))
        lines.append(_line(dataset, split, "all", [r for h in order for r in by_hops[h]]))
    return lines


def _line(dataset: str, split: str, hops: str, rows: list[ResultRow]) -> SummaryLine:
    n = len(rows)
    return SummaryLine(
        dataset=dataset,
        split=split,
        hops=hops,
        n=n,
        em=sum(r.em for r in rows) / n,
        f1=sum(r.f1 for r in rows) / n,
        cover_em=sum(r.cover_em for r in rows) / n,
        errors=sum(r.error is not None for r in rows),
        truncated=sum(r.truncated for r in rows),
        mean_turns=sum(r.turns for r in rows) / n,
        mean_searches=sum(r.searches for r in rows) / n,
    )


_HEADERS = ("dataset", "split", "hops", "n", "EM", "F1", "cover-EM", "errors", "truncated", "turns", "searches")


def to_markdown(lines: list[SummaryLine]) -> str:
    """A GitHub markdown table (scores to 3 decimals)."""
    out = ["| " + " | ".join(_HEADERS) + " |", "|" + "|".join(" --- " for _ in _HEADERS) + "|"]
    for ln in lines:
        cells = [ln.dataset, ln.split, ln.hops, str(ln.n), f"{ln.em:.3f}", f"{ln.f1:.3f}", f"{ln.cover_em:.3f}"]
        cells += [str(ln.errors), str(ln.truncated), f"{ln.mean_turns:.2f}", f"{ln.mean_searches:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def to_csv(lines: list[SummaryLine]) -> str:
    """CSV with the field names of `SummaryLine` as header (scores to 4 decimals)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([f.name for f in fields(SummaryLine)])
    for ln in lines:
        w.writerow([round(v, 4) if isinstance(v, float) else v for v in astuple(ln)])
    return buf.getvalue()


def summary_paths(out: Path) -> tuple[Path, Path]:
    """`run.jsonl` -> (`run.summary.md`, `run.summary.csv`); another name gets the suffixes appended."""
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    return stem.with_name(stem.name + ".summary.md"), stem.with_name(stem.name + ".summary.csv")


def write_summary(rows: list[ResultRow], out: Path) -> tuple[str, Path, Path]:
    """Write both summary files next to `out`; returns (markdown table, md path, csv path)."""
    lines = summarize(rows)
    table = to_markdown(lines)
    md_path, csv_path = summary_paths(out)
    agents = sorted({r.agent + (f" ({r.model})" if r.model else "") for r in rows})
    head = f"# trace-eval summary of `{out.name}`\n\nagent: {', '.join(agents) or '-'}\n\n"
    note = "\nEM/F1/cover-EM are means over all n questions; errored and truncated questions count as 0.\n"
    md_path.write_text(head + table + note, encoding="utf-8")
    csv_path.write_text(to_csv(lines), encoding="utf-8")
    return table, md_path, csv_path

"""Question sets the server serves by (dataset, split, index).

Format: FlashRAG / Search-R1 jsonl, one `{"id", "question", "golden_answers"}` object a line
(`golden_answers` may be a string; a `metadata` object is kept, e.g. the synthetic world's hops,
kind and oracle trajectory). A bad line fails start-up with its file and line number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from env_server.jsonl import iter_objects
from shared.wire import EnvError, ErrorCode

KNOWN_SPLITS = ("train", "dev", "validation", "val", "test")


@dataclass(frozen=True)
class QuestionRow:
    id: str
    question: str
    golden_answers: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)


def read_questions(path: Path) -> list[QuestionRow]:
    rows: list[QuestionRow] = []
    for where, obj in iter_objects(path):
        question = obj.get("question")
        golds = obj.get("golden_answers", obj.get("answers"))
        if isinstance(golds, str):
            golds = [golds]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
            raise ValueError(f"{where}: 'golden_answers' must be a non-empty list of strings")
        meta = obj.get("metadata") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: 'metadata' must be an object when present")
        rows.append(QuestionRow(str(obj.get("id", f"{path.stem}-{len(rows)}")), question, golds, meta))
    if not rows:
        raise ValueError(f"{path}: no questions")
    return rows


class DatasetRegistry:
    """name -> split -> rows."""

    def __init__(self) -> None:
        self.sets: dict[str, dict[str, list[QuestionRow]]] = {}

    def add(self, name: str, split: str, rows: list[QuestionRow]) -> None:
        if split in self.sets.setdefault(name, {}):
            raise ValueError(f"dataset {name!r} split {split!r} given twice")
        self.sets[name][split] = rows

    def add_spec(self, key: str, path: str | Path) -> None:
        """`--data KEY=PATH`: `name:split=file`, `name=file` (split from the stem) or `name=folder/` (its *.jsonl
        but corpus.jsonl)."""
        path = Path(path)
        name, _, split = key.partition(":")
        if not name:
            raise ValueError(f"--data {key}={path}: empty dataset name")
        if path.is_dir():  # a corpus.jsonl beside the splits (as `trace-world` writes it) is not a split
            files = sorted(f for f in path.glob("*.jsonl") if f.name != "corpus.jsonl")
            if not files:
                raise ValueError(f"--data {key}={path}: folder has no *.jsonl files")
            for f in files:
                self.add(name, f.stem, read_questions(f))
            return
        if not split:
            split = path.stem if path.stem in KNOWN_SPLITS else "test"
        self.add(name, split, read_questions(path))

    def get(self, name: str, split: str, index: int) -> QuestionRow:
        if name not in self.sets:
            # 422, not 404: the URL exists; a value in the body names nothing this server serves.
            raise EnvError(ErrorCode.INVALID_VALUE, f"no dataset {name!r}; available: {sorted(self.sets)}")
        splits = self.sets[name]
        if split not in splits:
            raise EnvError(
                ErrorCode.INVALID_VALUE, f"dataset {name!r} has no split {split!r}; available: {sorted(splits)}"
            )
        rows = splits[split]
        if not 0 <= index < len(rows):
            raise EnvError(
                ErrorCode.INVALID_VALUE, f"index {index} out of range for {name}/{split} (0..{len(rows) - 1})"
            )
        return rows[index]

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": n, "splits": {s: len(r) for s, r in sp.items()}} for n, sp in self.sets.items()]

"""Reading the jsonl files users hand the server (questions, corpora): one JSON object a line, blank lines
skipped, and a bad line reported with its file and line number instead of a traceback from deep inside."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

_decoder = msgspec.json.Decoder()


def iter_objects(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields ("FILE:LINE", object) per non-blank line; raises ValueError naming the line when it is not an object."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = _decoder.decode(line)
            except msgspec.DecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e}): {line[:120]!r}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj

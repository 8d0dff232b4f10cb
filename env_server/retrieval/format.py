"""Search results as the text a Search-R1 policy reads.

Matches `_passages2string` in Search-R1's `search_r1/llm_agent/generation.py` byte for byte: per hit,
`f"Doc {i}(Title: {title}) {text}\\n"`, where `title` is the first line of `contents` and `text` the remaining lines
joined by "\\n". Search-R1 does NOT strip the quotes FlashRAG puts around the title, so a wiki-18 passage reads
`Doc 1(Title: "Paris") Paris is the capital ...`; we keep them too, so checkpoints trained with Search-R1 see the
observations they were trained on. A `contents` without a newline is all title and an empty text, as there.

The caller wraps the result the way Search-R1 does: `f"\\n\\n<information>{format_observation(hits).strip()}"
"</information>\\n\\n"`.
"""

from __future__ import annotations

from env_server.retrieval.base import Hit


def format_observation(hits: list[Hit]) -> str:
    """'Doc 1(Title: "T") text\\nDoc 2(Title: ...) ...\\n' for `hits` in order; "" for no hits."""
    parts = []
    for i, hit in enumerate(hits, start=1):
        title, _, text = hit.contents.partition("\n")
        parts.append(f"Doc {i}(Title: {title}) {text}\n")
    return "".join(parts)

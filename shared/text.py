"""Answer normalisation that the judge (env server) and the trainer's predictor features share, so a
trainer deciding "the answer was seen" agrees with the server deciding "the answer is right"."""

from __future__ import annotations

import re
import string
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation (lowercase, drop punctuation and the articles a/an/the, squeeze whitespace),
    extended to Unicode punctuation (category P*) so curly quotes don't count."""
    s = unicodedata.normalize("NFKC", s).lower()
    s = "".join(ch for ch in s if ch not in _PUNCT and not unicodedata.category(ch).startswith("P"))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())

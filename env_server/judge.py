"""QA answer judging with SQuAD normalisation, as Search-R1 and FlashRAG score it.

normalise(s): lowercase -> drop ASCII/Unicode punctuation -> drop the articles a/an/the -> squeeze
whitespace. Against a list of gold answers each metric takes the best gold:
- em: normalised prediction == normalised gold;
- f1: token-level F1 of the normalised bags of words (SQuAD);
- cover_em: the normalised gold occurs in the normalised prediction as a whole-word span.
The reward of an episode is one of them (config `reward_metric`, EM by default); all three go in `info`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from shared.text import normalize_answer

__all__ = ["cover_exact_match", "exact_match", "f1_score", "judge", "normalize_answer"]


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    p_toks = normalize_answer(prediction).split()
    best = 0.0
    for g in golds:
        g_toks = normalize_answer(g).split()
        if not p_toks or not g_toks:
            best = max(best, float(p_toks == g_toks))
            continue
        common = sum((Counter(p_toks) & Counter(g_toks)).values())
        if common == 0:
            continue
        precision, recall = common / len(p_toks), common / len(g_toks)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def cover_exact_match(prediction: str, golds: Sequence[str]) -> float:
    p = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(g) and f" {normalize_answer(g)} " in p for g in golds))


def judge(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """All metrics of one prediction: {"em", "f1", "cover_em"}."""
    if not golds:
        raise ValueError("cannot judge an answer without gold answers")
    return {
        "em": exact_match(prediction, golds),
        "f1": f1_score(prediction, golds),
        "cover_em": cover_exact_match(prediction, golds),
    }

"""The QA judge (env_server/judge.py): SQuAD normalisation and EM / F1 / cover-EM, with values worked out by hand."""

from __future__ import annotations

import re
import string

import pytest

from env_server.judge import cover_exact_match, exact_match, f1_score, judge, normalize_answer


def squad_normalize(s: str) -> str:
    """The reference: SQuAD v1.1's evaluate script, verbatim in behaviour (ASCII punctuation only)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


@pytest.mark.parametrize(
    ("text", "norm"),
    [
        # articles: whole words only, anywhere
        ("The Beatles", "beatles"),
        ("a Tale of an Apple and the Pie", "tale of apple and pie"),
        ("the", ""),
        ("Theater Anthem Another", "theater anthem another"),
        ("THE an A", ""),
        # punctuation is deleted (not replaced by a space), as in SQuAD
        ("U.S.A.", "usa"),
        ("rock-n-roll!", "rocknroll"),
        ("The.Beatles", "thebeatles"),
        ("O'Brien, Jr.", "obrien jr"),
        ("(1990)", "1990"),
        # Unicode punctuation too: curly quotes, guillemets, dashes, inverted marks, CJK full stop
        ("\u201cParis\u201d", "paris"),
        ("\u2018Paris\u2019", "paris"),
        ("\u00abParis\u00bb", "paris"),
        ("Paris \u2014 France", "paris france"),
        ("\u00bfQu\u00e9?", "qu\u00e9"),
        ("\u6771\u4eac\u3002", "\u6771\u4eac"),
        # case and width (NFKC)
        ("PARIS", "paris"),
        ("\uff30\uff21\uff32\uff29\uff33", "paris"),
        ("Caf\u00e9", "caf\u00e9"),
        ("the\u00e9", "the\u00e9"),  # not the article: \u00e9 is a word character
        # whitespace
        ("  new \t york\n ", "new york"),
        ("new\u00a0york", "new york"),
        ("", ""),
        ("   ", ""),
        ("?!.", ""),
    ],
)
def test_normalize_answer(text: str, norm: str) -> None:
    assert normalize_answer(text) == norm


@pytest.mark.parametrize(
    "text",
    ["The Beatles", "U.S.A.", "  An  apple, a day!  ", "rock-n-roll", "Mr. O'Neil's \"book\"", "a-team", "1,000"],
)
def test_ascii_normalisation_matches_squad(text: str) -> None:
    assert normalize_answer(text) == squad_normalize(text)


def test_exact_match() -> None:
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert exact_match("NYC", ["New York City", "NYC"]) == 1.0  # any gold
    assert exact_match("\u201cnew  york\u201d", ["New York"]) == 1.0
    assert exact_match("New-York", ["New York"]) == 0.0  # "newyork" != "new york", as in SQuAD
    assert exact_match("", ["x"]) == 0.0


def test_f1_by_hand() -> None:
    # pred {varo, tessin, painter} vs gold {varo, tessin}: P = 2/3, R = 1, F1 = 2PR/(P+R) = 0.8
    assert f1_score("Varo Tessin the painter", ["Varo Tessin"]) == pytest.approx(0.8)
    # pred {tessin} vs gold {varo, tessin}: P = 1, R = 1/2, F1 = 2/3
    assert f1_score("Tessin", ["Varo Tessin"]) == pytest.approx(2 / 3)
    # bag of words: pred [x, x, y] vs gold [x, y]: common = 2, P = 2/3, R = 1 -> 0.8
    assert f1_score("x x y", ["x y"]) == pytest.approx(0.8)
    # order does not matter; no overlap gives 0
    assert f1_score("Tessin Varo", ["Varo Tessin"]) == 1.0
    assert f1_score("Kelmar", ["Varo Tessin"]) == 0.0
    # best gold wins: 0.8 against the first, 1/2 against the second (P = 1/3, R = 1 -> 0.5)
    assert f1_score("Varo Tessin painter", ["Varo Tessin", "painter"]) == pytest.approx(0.8)
    # empty after normalisation: 1 only when both are empty (SQuAD), 0 otherwise
    assert f1_score("", ["Varo"]) == 0.0
    assert f1_score("the", ["a"]) == 1.0
    assert f1_score("Varo", ["the"]) == 0.0


def test_cover_exact_match_is_a_whole_word_span() -> None:
    assert cover_exact_match("It was Varo Tessin, the painter.", ["Varo Tessin"]) == 1.0
    assert cover_exact_match("Varo Tessins", ["Varo Tessin"]) == 0.0  # not a whole word
    assert cover_exact_match("Tessin Varo", ["Varo Tessin"]) == 0.0  # order matters for a span
    assert cover_exact_match("in 1861", ["1861", "1862"]) == 1.0
    assert cover_exact_match("anything", ["the"]) == 0.0  # an empty gold covers nothing
    assert cover_exact_match("Varo Tessin", ["Varo Tessin"]) == 1.0


def test_judge_reports_all_three() -> None:
    assert judge("Varo Tessin the painter", ["Varo Tessin"]) == {"em": 0.0, "f1": pytest.approx(0.8), "cover_em": 1.0}
    assert judge("Varo Tessin", ["Varo Tessin"]) == {"em": 1.0, "f1": 1.0, "cover_em": 1.0}
    with pytest.raises(ValueError, match="gold"):
        judge("x", [])

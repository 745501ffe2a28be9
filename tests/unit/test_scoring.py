"""Metrics against hand-computed values."""

import pytest

from lorakit import scoring
from lorakit.errors import LorakitError


def test_token_f1_by_hand():
    assert scoring.token_f1("The cat sat.", "the cat sat") == 1.0
    # pred: [cat, is, black], ref: [cat, is, white, and, black] -> common 3, P=3/3, R=3/5, F1=0.75
    assert scoring.token_f1("a cat is black", "The cat is white and black") == pytest.approx(0.75)
    assert scoring.token_f1("dog", "cat") == 0.0
    assert scoring.token_f1("", "") == 1.0


def test_exact_match_contains_and_normalizers():
    totals, per = scoring.score(
        ["SELECT a FROM t;", "select  A from T", "no"],
        ["select a from t", "SELECT a FROM t", "yes"],
        ["exact_match", "contains"],
        {},
        normalize=["sql"],
    )
    # The sql normalizer drops ';' and lowercases keywords and identifiers (SQL is case-insensitive).
    assert [p["exact_match"] for p in per] == [1.0, 1.0, 0.0]
    assert totals["exact_match"] == pytest.approx(2 / 3)
    _, per = scoring.score(
        ["SELECT a FROM t WHERE c = 'X'"], ["select a from t where c = 'x'"], ["exact_match"], {}, ["sql"]
    )
    assert per[0]["exact_match"] == 0.0  # string literals stay case-sensitive
    totals, per = scoring.score(
        ["Hello  World"], ["hello world"], ["exact_match"], {}, normalize=["case", "whitespace"]
    )
    assert per[0]["exact_match"] == 1.0
    totals, per = scoring.score(["The answer is Paris, of course"], ["Paris"], ["contains", "exact_match"], {})
    assert per[0] == {"contains": 1.0, "exact_match": 0.0}


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat sat") = 3 tokens: P = 3/6, R = 3/3, F = 2/3.
    _, per = scoring.score(["the cat sat on the mat"], ["the cat sat"], ["rouge_l"], {})
    assert per[0]["rouge_l"] == pytest.approx(2 / 3)


def test_bleu_and_chrf_identity_and_disjoint():
    totals, _ = scoring.score(["the cat sat on the mat"], ["the cat sat on the mat"], ["bleu", "chrf"], {})
    assert totals["bleu"] == pytest.approx(100.0) and totals["chrf"] == pytest.approx(100.0)
    totals, _ = scoring.score(["xyz qqq"], ["the cat sat on the mat"], ["bleu", "chrf"], {})
    assert totals["bleu"] == pytest.approx(0.0) and totals["chrf"] < 5


def test_user_metric_and_unknown_names():
    builtin, user = scoring.resolve(["token_f1", "os.path:exists"])
    assert builtin == ["token_f1"] and callable(user["os.path:exists"])
    with pytest.raises(LorakitError, match="--metric 'blue' does not exist"):
        scoring.resolve(["blue"])
    with pytest.raises(LorakitError, match="module 'no_such_mod' not found"):
        scoring.resolve(["no_such_mod:f"])
    with pytest.raises(LorakitError, match="has no function 'nope'"):
        scoring.resolve(["os.path:nope"])
    with pytest.raises(LorakitError, match="unknown normalizer"):
        scoring.normalizer(["upper"])
    totals, per = scoring.score(["abc"], ["abcd"], [], {"len_ratio": lambda p, r: len(p) / len(r)})
    assert per[0]["len_ratio"] == pytest.approx(0.75) and totals["len_ratio"] == pytest.approx(0.75)

"""Scoring generated answers against reference answers: the metrics and normalizers of `lorakit eval`.

BLEU and chrF come from sacrebleu and ROUGE-L from Google's rouge-score (the reference
implementations); exact match, contains and token F1 are the standard SQuAD-style definitions.
A user metric is any `module:function(prediction, reference) -> float`.
"""

from __future__ import annotations

import importlib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from lorakit.errors import LorakitError

BUILTIN = ("exact_match", "contains", "token_f1", "rouge_l", "bleu", "chrf")
_SQL_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)
_SQL_LITERAL = re.compile(r"('(?:[^']|'')*')")  # a single-quoted SQL string, '' being an escaped quote


def normalize_sql(s: str) -> str:
    """Canonical form of one SQL query for exact match.

    Drops a Markdown code fence, the trailing `;` and whitespace differences, and lowercases everything
    outside string literals (SQL keywords and identifiers are case-insensitive; 'Berlin' is not).
    """
    s = s.strip()
    fenced = _SQL_FENCE.match(s)
    if fenced:
        s = fenced.group(1)
    parts = _SQL_LITERAL.split(s.strip().rstrip(";").strip())
    # split() with a capturing group puts the literals at the odd indices.
    for i in range(0, len(parts), 2):
        code = re.sub(r"\s+", " ", parts[i].lower())
        parts[i] = re.sub(r"\s*([(),=<>*])\s*", r"\1", code)
    return "".join(parts).strip()


NORMALIZERS: dict[str, Callable[[str], str]] = {
    "case": str.lower,
    "whitespace": lambda s: " ".join(s.split()),
    "sql": normalize_sql,  # SQL keyword and identifier case, spacing, trailing ';', code fences
}


def normalizer(names: Sequence[str]) -> Callable[[str], str]:
    """Compose the named normalizers (applied in order); unknown names are an error."""
    unknown = [n for n in names if n not in NORMALIZERS]
    if unknown:
        raise LorakitError(f"--normalize: unknown normalizer(s) {unknown}; choose from {', '.join(NORMALIZERS)}")

    def apply(text: str) -> str:
        text = text.strip()
        for n in names:
            text = NORMALIZERS[n](text)
        return text

    return apply


def _squad_tokens(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1: overlap of lowercased, punctuation- and article-free word bags."""
    p, r = _squad_tokens(pred), _squad_tokens(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def resolve(names: Sequence[str]) -> tuple[list[str], dict[str, Callable[[str, str], float]]]:
    """Split --metric values into built-in names and loaded `module:function` user metrics."""
    builtin, user = [], {}
    for name in names:
        if ":" in name:
            user[name] = _load_user(name)
        elif name in BUILTIN:
            builtin.append(name)
        else:
            raise LorakitError(
                f"--metric '{name}' does not exist; use one of {', '.join(BUILTIN)} or "
                "module:function for your own (a function of (prediction, reference) -> float)"
            )
    return builtin or list(BUILTIN), user


def _load_user(spec: str) -> Callable[[str, str], float]:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ModuleNotFoundError:
        raise LorakitError(f"--metric {spec}: module '{module_name}' not found (is it on PYTHONPATH?)") from None
    except AttributeError:
        raise LorakitError(f"--metric {spec}: module '{module_name}' has no function '{attr}'") from None
    if not callable(fn):
        raise LorakitError(f"--metric {spec}: '{attr}' is not a function")
    return fn


def score(
    preds: Sequence[str],
    refs: Sequence[str],
    builtin: Sequence[str],
    user: dict[str, Callable[[str, str], float]],
    normalize: Sequence[str] = (),
) -> tuple[dict, list[dict]]:
    """Corpus-level metrics and per-example scores (0..1 for per-example metrics, 0..100 for BLEU/chrF)."""
    norm = normalizer(normalize)
    per: list[dict] = [{} for _ in preds]
    per_example = {
        "exact_match": lambda p, r: float(norm(p) == norm(r)),
        "contains": lambda p, r: float(norm(r) in norm(p)),
        "token_f1": token_f1,
        **user,
    }
    for name in [*[b for b in builtin if b in per_example], *user]:
        for i, (p, r) in enumerate(zip(preds, refs)):
            per[i][name] = float(per_example[name](p, r))
    if "rouge_l" in builtin:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        for i, (p, r) in enumerate(zip(preds, refs)):
            per[i]["rouge_l"] = scorer.score(r, p)["rougeL"].fmeasure
    totals = {k: sum(d[k] for d in per) / len(per) for k in (per[0] if per else {})}
    if preds and ("bleu" in builtin or "chrf" in builtin):
        import sacrebleu

        if "bleu" in builtin:
            totals["bleu"] = sacrebleu.corpus_bleu(list(preds), [list(refs)]).score
        if "chrf" in builtin:
            totals["chrf"] = sacrebleu.corpus_chrf(list(preds), [list(refs)]).score
    return totals, per

"""SQuAD v1.1 scoring, pure: answer normalisation, exact match and token F1 (the official
evaluate-v1.1.py rules), and the best answer span of a window's start/end logits (the
post-processing of Hugging Face's run_qa.py). No torch."""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np

__all__ = ["normalize_answer", "exact_match", "f1_score", "best_over_golds", "best_span", "best_answers",
           "squad_scores"]

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall over the normalised words."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric, prediction: str, golds: Sequence[str]) -> float:
    return max(metric(prediction, g) for g in golds)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> tuple[float, float]:
    """(exact match, F1) as fractions in [0, 1], averaged over questions, each scored against
    the best of its gold answers."""
    assert len(predictions) == len(golds) > 0
    em = sum(best_over_golds(exact_match, p, g) for p, g in zip(predictions, golds))
    f1 = sum(best_over_golds(f1_score, p, g) for p, g in zip(predictions, golds))
    return em / len(golds), f1 / len(golds)


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray, n_best: int = 20,
              max_answer_tokens: int = 30) -> tuple[float, int, int]:
    """(score, first char, end char) of a window's best answer: among the n_best highest start
    and end logits, the pair of context tokens (offsets >= 0) with end >= start, at most
    max_answer_tokens long, scoring start + end logit highest. (-inf, 0, 0) when none is valid.
    An example's answer is the best over its windows: scores of one model compare across them."""
    context = offsets[:, 0] >= 0
    starts = np.argsort(start_logits)[::-1][:n_best]
    ends = np.argsort(end_logits)[::-1][:n_best]
    s, e = starts[:, None], ends[None, :]
    valid = context[s] & context[e] & (e >= s) & (e - s < max_answer_tokens)
    if not valid.any():
        return float("-inf"), 0, 0
    score = np.where(valid, start_logits[s] + end_logits[e], -np.inf)
    i, j = np.unravel_index(int(np.argmax(score)), score.shape)
    return float(score[i, j]), int(offsets[starts[i], 0]), int(offsets[ends[j], 1])


def best_answers(spans: np.ndarray, owner: np.ndarray, contexts: Sequence[str]) -> list[str]:
    """Each question's answer: the span of its highest-scoring window, cut from its context.
    `spans` (windows, 3): score, first char, end char (best_span's); `owner`: each window's
    question. A question without a valid span in any window answers "" (scored 0)."""
    best = np.full(len(contexts), -np.inf)
    np.maximum.at(best, owner, spans[:, 0])
    answers = [""] * len(contexts)
    for w in np.flatnonzero((spans[:, 0] == best[owner]) & np.isfinite(spans[:, 0])):
        answers[owner[w]] = contexts[owner[w]][int(spans[w, 1]):int(spans[w, 2])]
    return answers

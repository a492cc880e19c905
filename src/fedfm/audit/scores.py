"""How well an attack did, as pure functions: ROUGE-L and token precision/recall for recovered
text, label-count error for recovered labels, AUC and TPR at a fixed FPR for membership."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(reference: Sequence, candidate: Sequence) -> float:
    """ROUGE-L F1 (β = 1) of ``candidate`` against ``reference`` (token sequences): 2PR/(P+R) with
    P = LCS/len(candidate), R = LCS/len(reference); 0 when either is empty."""
    lcs = lcs_length(reference, candidate)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def best_rouge_l(references: Sequence[Sequence], candidates: Sequence[Sequence]) -> float:
    """The mean over references of the best ROUGE-L any candidate reaches (0 with no candidate):
    what an attacker who recovered ``candidates`` learned about each of the client's texts."""
    if not references:
        raise ValueError("no reference texts")
    return float(np.mean([max((rouge_l(r, c) for c in candidates), default=0.0) for r in references]))


def set_precision_recall(true: set, recovered: set) -> tuple[float, float]:
    """Precision |T ∩ R| / |R| (1 when nothing was claimed) and recall |T ∩ R| / |T|."""
    hit = len(true & recovered)
    precision = hit / len(recovered) if recovered else 1.0
    recall = hit / len(true) if true else 1.0
    return precision, recall


def label_count_error(true_counts: Sequence[float], estimated: Sequence[float]) -> float:
    """Σ_c |n̂_c − n_c| / Σ_c n_c: 0 when every class count is right, 2 at most for a non-negative
    estimate of the same total; the fraction of the batch's labels misplaced, counted twice."""
    true_counts, estimated = np.asarray(true_counts, float), np.asarray(estimated, float)
    total = true_counts.sum()
    if total <= 0:
        raise ValueError("label counts must add up to a positive total")
    return float(np.abs(estimated - true_counts).sum() / total)


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """Area under the ROC curve of "higher score ⇒ member": P(S_member > S_non) + ½ P(tie), the
    Mann-Whitney statistic (exact, ties counted half)."""
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if not len(m) or not len(n):
        raise ValueError("AUC needs members and non-members")
    ranks = _average_ranks(np.concatenate([m, n]))
    return float((ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(n)))


def tpr_at_fpr(member_scores: Sequence[float], nonmember_scores: Sequence[float], fpr: float = 0.01) -> float:
    """The largest true-positive rate of a threshold rule "score > τ ⇒ member" whose false-positive
    rate on the non-members is at most ``fpr`` (Carlini et al. 2022's low-FPR view)."""
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    allowed = int(np.floor(fpr * len(n) + 1e-9))  # non-members allowed above the threshold
    ordered = np.sort(n)[::-1]
    threshold = ordered[allowed] if allowed < len(ordered) else -np.inf
    return float((m > threshold).mean())


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def fmt(value, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` places, ∞ for infinity, — for a missing value."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)

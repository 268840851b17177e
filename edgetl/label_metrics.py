"""Multi-label metrics in numpy: per-label average precision, mAP, F1-tuned thresholds, micro/macro F1, exact match.

`average_precision` is scikit-learn's `average_precision_score` (sklearn.metrics, "AP summarizes a
precision-recall curve as the weighted mean of precisions achieved at each threshold, with the
increase in recall from the previous threshold used as the weight": Σₙ (Rₙ − Rₙ₋₁) Pₙ, one
threshold per distinct score, no interpolation), rewritten here so the build needs no sklearn.
F1 averages follow `sklearn.metrics.f1_score` (micro: from the summed counts; macro: the mean of
per-label F1, 0 where a label has no positive and no prediction).

The primary metric of a multi-label build, the one reported as `accuracy` (and `val_accuracy`)
where the pipeline selects, sweeps and gates on one number, is mAP: the mean AP over the labels
with at least one positive image.
"""

from __future__ import annotations

import numpy as np

from edgetl.runtime.readout import Readout

FALLBACK_THRESHOLD = 0.5  # a label without a positive val image: its F1 cannot be tuned


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return Readout("multilabel").probabilities(logits)


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """AP of one label: `truth` (N,) 0/1, `scores` (N,) any monotone score; NaN without a positive.

    >>> average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.8333333333333333
    """
    positives = int(truth.sum())
    if positives == 0:
        return float("nan")
    tp, fp, _ = _cumulative(truth, scores)
    precision, recall = tp / (tp + fp), tp / positives
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _cumulative(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives when predicting every score ≥ each distinct score, highest first, and those
    distinct scores."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], truth[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last image of each distinct score
    return np.cumsum(y)[last], np.cumsum(1 - y)[last], s[last]


def tune_thresholds(probabilities: np.ndarray, truth: np.ndarray) -> tuple[float, ...]:
    """Per label, the probability threshold that maximizes its F1 on these (val) images: halfway between the
    lowest probability it admits and the next lower one (a margin for quantization's small shifts);
    `FALLBACK_THRESHOLD` for a label without a positive. `probabilities`, `truth`: (N, C)."""
    thresholds = []
    for c in range(truth.shape[1]):
        positives = int(truth[:, c].sum())
        if positives == 0:
            thresholds.append(FALLBACK_THRESHOLD)
            continue
        tp, fp, s = _cumulative(truth[:, c], probabilities[:, c])
        best = int(np.argmax(2 * tp / (tp + fp + positives)))  # F1 = 2TP / (2TP + FP + FN); first of ties
        lower = s[best + 1] if best + 1 < len(s) else 0.0
        thresholds.append(float((s[best] + lower) / 2))
    return tuple(thresholds)


def scores(logits: np.ndarray, truth: np.ndarray, thresholds: tuple[float, ...]) -> dict:
    """mAP, per-label AP, micro and macro F1 and the exact-match ratio of (N, C) `logits` against (N, C) 0/1
    `truth`, the label sets thresholded at `thresholds` (probabilities, one per label)."""
    probabilities = sigmoid(logits)
    # AP on the logits: the same order as the probabilities, without sigmoid's ties where it rounds to 1.0
    ap = [average_precision(truth[:, c], logits[:, c]) for c in range(truth.shape[1])]
    predicted, actual = probabilities >= np.asarray(thresholds), truth.astype(bool)
    tp = (predicted & actual).sum(axis=0)
    wrong = (predicted != actual).sum(axis=0)  # FP + FN per label
    per_label_f1 = np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0)
    counted = [a for a in ap if not np.isnan(a)]
    return {
        "map": float(np.mean(counted)) if counted else 0.0,
        "micro_f1": float(2 * tp.sum() / max(2 * tp.sum() + wrong.sum(), 1)),
        "macro_f1": float(per_label_f1.mean()),
        "exact_match": float((predicted == actual).all(axis=1).mean()) if len(truth) else 0.0,
        "per_label_ap": [None if np.isnan(a) else round(a, 6) for a in ap],
        "thresholds": [float(t) for t in thresholds],  # unrounded: the bundle carries these to the device
    }


def mean_average_precision(logits: np.ndarray, truth: np.ndarray) -> float:
    """mAP over the labels with a positive (0.0 when none has): the primary metric of a multi-label build."""
    counted = [a for c in range(truth.shape[1]) if not np.isnan(a := average_precision(truth[:, c], logits[:, c]))]
    return float(np.mean(counted)) if counted else 0.0


def bce(logits: np.ndarray, truth: np.ndarray) -> float:
    """Mean binary cross-entropy with logits over every image and label (torch's BCEWithLogitsLoss)."""
    x = logits.astype(np.float64)
    return float(np.mean(np.logaddexp(0.0, x) - truth * x))


def variant_scores(logits: np.ndarray, reference: np.ndarray, truth: np.ndarray, readout: Readout) -> dict:
    """A validation row's fields for a multi-label variant: `accuracy` is its test mAP, `agreement` the share of
    test images whose thresholded label set is the baseline's (`reference` logits), `accuracy_drop` the baseline's
    mAP minus this one's, and `multilabel` the rest (`scores`, and the largest |Δ probability| from the baseline)."""
    measured = scores(logits, truth, readout.thresholds)
    largest = np.abs(readout.probabilities(logits) - readout.probabilities(reference)).max() if len(logits) else 0.0
    return {
        "accuracy": measured["map"],
        "agreement": float(readout.agree(logits, reference).mean()) if len(logits) else 1.0,
        "accuracy_drop": mean_average_precision(reference, truth) - measured["map"],
        "multilabel": measured | {"max_abs_prob_delta": float(largest)},
    }

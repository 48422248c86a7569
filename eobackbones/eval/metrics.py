"""Probe metrics in numpy, matching scikit-learn's definitions (sklearn is a test-only dependency)."""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["average_precision", "bootstrap_ci", "miou", "multilabel_metrics", "singlelabel_metrics"]


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Per-class F1 = 2TP / (2TP + FP + FN); NaN where undefined (no positives, no predictions)."""
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def singlelabel_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 of ``argmax(scores)``.

    Macro F1 averages over the classes present in ``y_true`` or in the predictions (other
    classes have undefined F1), as ``sklearn.metrics.f1_score(average="macro")``.

    Args:
        y_true: (N,) int class indices.
        scores: (N, K) class scores or probabilities.
    """
    y_true = np.asarray(y_true).astype(np.int64)
    scores = np.asarray(scores)
    k = max(scores.shape[1], int(y_true.max()) + 1)
    pred = scores.argmax(1)
    conf = np.bincount(y_true * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(conf).astype(np.float64)
    f1 = _f1_from_counts(tp, conf.sum(0) - tp, conf.sum(1) - tp)
    return {"accuracy": float((pred == y_true).mean()), "f1_macro": float(np.nanmean(f1))}


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Binary average precision, sum_n (R_n - R_{n-1}) P_n over distinct thresholds (sklearn's).

    Tied scores form one threshold (no interpolation). NaN if ``y_true`` has no positive.
    """
    y_true = np.asarray(y_true).ravel() > 0
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = y_true.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], y_true[order]
    # Last position of each run of equal scores = one threshold.
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def multilabel_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Average precision and F1 for multi-label predictions.

    ``map_macro`` averages per-class AP over classes with at least one positive in ``y_true``
    (AP is undefined otherwise; sklearn would count those classes as 0). ``map_micro`` is the AP
    of all (sample, class) pairs pooled. F1 uses ``scores >= threshold``; ``f1_macro`` averages
    over classes that have a positive or a prediction (``f1_score(zero_division=np.nan)``),
    ``f1_micro`` pools the counts.

    Args:
        y_true: (N, K) multi-hot.
        scores: (N, K) probabilities.
        threshold: Decision threshold for F1.
    """
    y_true = np.asarray(y_true) > 0
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.shape != scores.shape or y_true.ndim != 2:
        raise ValueError(f"expected matching (N, K) arrays, got {y_true.shape} and {scores.shape}")
    ap = np.array([average_precision(y_true[:, c], scores[:, c]) for c in range(y_true.shape[1])])
    pred = scores >= threshold
    tp = (pred & y_true).sum(0).astype(np.float64)
    fp = (pred & ~y_true).sum(0).astype(np.float64)
    fn = (~pred & y_true).sum(0).astype(np.float64)
    f1 = _f1_from_counts(tp, fp, fn)
    micro = _f1_from_counts(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))[0]
    nan = float("nan")
    return {
        "map_macro": float(np.nanmean(ap)) if np.isfinite(ap).any() else nan,
        "map_micro": average_precision(y_true, scores),
        "f1_macro": float(np.nanmean(f1)) if np.isfinite(f1).any() else nan,
        "f1_micro": float(np.nan_to_num(micro)),  # no positives and no predictions -> 0, as sklearn
    }


def miou(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = None) -> float:
    """Mean intersection-over-union of label maps of any shape.

    Pixels whose target equals ``ignore_index`` are skipped. Classes absent from both
    prediction and target (union 0) are excluded from the mean.
    """
    pred = np.asarray(pred).ravel().astype(np.int64)
    target = np.asarray(target).ravel().astype(np.int64)
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, a in (("pred", pred), ("target", target)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} has values outside [0, {num_classes})")
    conf = np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    if not (union > 0).any():
        return float("nan")
    return float(np.mean(inter[union > 0] / union[union > 0]))


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y_true: np.ndarray,
    scores: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a metric, resampling rows with replacement.

    Resamples where the metric is undefined (NaN, e.g. a class losing all positives) are
    ignored by the percentiles.

    Args:
        metric_fn: ``metric_fn(y_true, scores) -> float``.
        y_true: Labels, first axis = samples.
        scores: Scores, first axis = samples.
        n_boot: Number of resamples.
        seed: Seed of the resampling (the interval is deterministic per seed).
        alpha: Two-sided level; returns the (alpha/2, 1 - alpha/2) quantiles.
    """
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    stats = np.array([metric_fn(y_true[i], scores[i]) for i in rng.integers(0, n, size=(n_boot, n))], dtype=np.float64)
    lo, hi = np.nanquantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)

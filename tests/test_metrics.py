"""Probe metrics and classifiers against scikit-learn (a test-only dependency)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, jaccard_score

from eobackbones.data import load_bigearthnet_mini
from eobackbones.eval import (
    average_precision,
    band_statistics_features,
    bootstrap_ci,
    fit_linear_probe,
    knn_scores,
    miou,
    multilabel_metrics,
    singlelabel_metrics,
)


@pytest.mark.parametrize("seed", range(5))
def test_singlelabel_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 6
    y = rng.integers(0, 4, 50)  # classes 4, 5 never true, but may be predicted
    scores = rng.normal(size=(50, k))
    scores[np.arange(50), y] += rng.uniform(0, 2, 50)
    m = singlelabel_metrics(y, scores)
    pred = scores.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_singlelabel_perfect_and_absent_classes() -> None:
    y = np.array([0, 0, 2, 2])
    m = singlelabel_metrics(y, np.eye(3)[y])
    assert m == {"accuracy": 1.0, "f1_macro": 1.0}  # class 1: no true, no predicted -> excluded


@pytest.mark.parametrize("seed", range(5))
def test_multilabel_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 60, 7
    y = (rng.random((n, k)) < 0.3).astype(int)
    y[:, 3] = 0  # a class absent from y_true
    # Rounded scores create ties, which AP must treat as one threshold.
    scores = np.clip(np.round(0.4 * y + rng.random((n, k)) * 0.7, 1), 0, 1)
    m = multilabel_metrics(y, scores)
    present = y.sum(0) > 0
    assert m["map_macro"] == pytest.approx(average_precision_score(y[:, present], scores[:, present], average="macro"))
    assert m["map_micro"] == pytest.approx(average_precision_score(y, scores, average="micro"))
    pred = (scores >= 0.5).astype(int)
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=np.nan))
    assert m["f1_micro"] == pytest.approx(f1_score(y, pred, average="micro"))


def test_average_precision_binary_ties_and_no_positive() -> None:
    y = np.array([1, 0, 1, 1, 0, 0, 1])
    s = np.array([0.9, 0.9, 0.5, 0.5, 0.5, 0.1, 0.0])
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))
    assert np.isnan(average_precision(np.zeros(4), np.arange(4)))


@pytest.mark.parametrize("ignore_index", [None, 255])
def test_miou_matches_jaccard(ignore_index: int | None) -> None:
    rng = np.random.default_rng(1)
    target = rng.integers(0, 4, (3, 16, 16))  # class 4 of 5 never appears in target
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 4, target.shape))
    if ignore_index is not None:
        target[:, :4] = ignore_index
    keep = target != ignore_index if ignore_index is not None else np.ones(target.shape, bool)
    ref = jaccard_score(target[keep], pred[keep], average="macro")
    assert miou(pred, target, 5, ignore_index) == pytest.approx(ref)
    assert miou(target, target, 5, ignore_index) == 1.0
    with pytest.raises(ValueError, match="outside"):
        miou(pred + 5, target, 5)


def test_bootstrap_ci_contains_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    scores = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[y]

    def acc(yt: np.ndarray, s: np.ndarray) -> float:
        return singlelabel_metrics(yt, s)["accuracy"]

    point = acc(y, scores)
    lo, hi = bootstrap_ci(acc, y, scores, n_boot=300, seed=3)
    assert lo < point < hi and hi - lo < 0.2
    assert bootstrap_ci(acc, y, scores, n_boot=300, seed=3) == (lo, hi)
    assert bootstrap_ci(acc, y, scores, n_boot=300, seed=4) != (lo, hi)


def _blobs(n: int, d: int, k: int, sep: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * sep
    y = rng.integers(0, k, n)
    return centers[y] + rng.normal(size=(n, d)), y


def test_logreg_matches_sklearn_on_synthetic() -> None:
    x, y = _blobs(600, 10, 4, 1.0, seed=0)
    tr, va, te = slice(0, 300), slice(300, 400), slice(400, 600)
    probe = fit_linear_probe(x[tr], y[tr], x[va], y[va], multilabel=False)
    acc = singlelabel_metrics(y[te], probe.predict_scores(x[te]))["accuracy"]
    x_fit, y_fit = x[:400], y[:400]
    mu, sd = x_fit.mean(0), x_fit.std(0)
    ref = LogisticRegression(C=1 / (len(x_fit) * probe.chosen_l2), max_iter=5000, tol=1e-10)
    ref.fit((x_fit - mu) / sd, y_fit)
    ref_acc = accuracy_score(y[te], ref.predict((x[te] - mu) / sd))
    assert acc > 0.8  # the problem is learnable
    assert abs(acc - ref_acc) <= 0.01
    # Same convex objective -> same solution.
    np.testing.assert_allclose(probe.predict_scores(x[te]), ref.predict_proba((x[te] - mu) / sd), atol=2e-3)


def test_logreg_matches_sklearn_on_real_band_statistics() -> None:
    data = load_bigearthnet_mini()
    f = band_statistics_features(data.images["s2"])
    tr, va, te = (data.split == s for s in ("train", "val", "test"))
    probe = fit_linear_probe(f[tr], data.labels[tr], f[va], data.labels[va], multilabel=True)
    ours = probe.predict_scores(f[te])
    fit = tr | va
    mu, sd = f[fit].mean(0), f[fit].std(0)
    c = 1 / (fit.sum() * probe.chosen_l2)
    cols = [j for j in range(data.num_classes) if 0 < data.labels[fit, j].sum() < fit.sum()]
    ref = np.stack([
        LogisticRegression(C=c, max_iter=10000, tol=1e-10).fit((f[fit] - mu) / sd, data.labels[fit, j])
        .predict_proba((f[te] - mu) / sd)[:, 1]
        for j in cols
    ], axis=1)
    np.testing.assert_allclose(ours[:, cols], ref, atol=5e-3)
    y_te = data.labels[te][:, cols]
    assert multilabel_metrics(y_te, ours[:, cols])["map_macro"] == pytest.approx(
        multilabel_metrics(y_te, ref)["map_macro"], abs=0.01)
    # Band statistics carry real signal: well above the label-prevalence (chance) level.
    m = multilabel_metrics(data.labels[te], ours)
    chance = np.mean([data.labels[te][:, j].mean() for j in range(data.num_classes) if data.labels[te][:, j].any()])
    assert m["map_macro"] > chance + 0.1


def test_l2_sweep_adapts_to_the_problem() -> None:
    rng = np.random.default_rng(0)
    # Noise-free linear labels and plenty of data: the weakest regularisation wins.
    x = rng.normal(size=(900, 5))
    y = (x @ rng.normal(size=(5, 3))).argmax(1)
    easy = fit_linear_probe(x[:600], y[:600], x[600:], y[600:], multilabel=False)
    # 20 balanced samples, 100 weakly informative dims: the unregularised fit chases noise,
    # strong shrinkage (towards the class-mean-difference direction) generalises better.
    y2 = np.r_[np.tile([0, 1], 10), rng.integers(0, 2, 1000)]
    x2 = 0.2 * (2 * y2[:, None] - 1) + rng.normal(size=(len(y2), 100))
    hard = fit_linear_probe(x2[:20], y2[:20], x2[20:], y2[20:], multilabel=False)
    assert easy.chosen_l2 <= 1e-4
    assert hard.chosen_l2 >= 1e-1
    assert easy.val_scores[easy.chosen_l2] > easy.val_scores[10.0] + 0.2
    assert hard.val_scores[hard.chosen_l2] > hard.val_scores[1e-6]
    assert len(easy.val_scores) == len(hard.val_scores) == 8


def test_knn_weighting() -> None:
    x_train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    y_train = np.array([0, 0, 1])
    s = knn_scores(x_train, y_train, np.array([[1.0, 0.05], [0.1, 1.0]]), k=3, num_classes=2)
    assert s.argmax(1).tolist() == [0, 1]
    np.testing.assert_allclose(s.sum(1), 1, atol=1e-6)
    # Weights exp(cos / T): check one row by hand.
    xt = np.array([0.1, 1.0]) / np.linalg.norm([0.1, 1.0])
    cos = (x_train / np.linalg.norm(x_train, axis=1, keepdims=True)) @ xt
    w = np.exp(cos / 0.07)
    assert s[1, 1] == pytest.approx(w[2] / w.sum(), rel=1e-5)
    ml = knn_scores(x_train, np.array([[1, 1], [1, 0], [0, 1]]), x_train[:1], k=1, multilabel=True)
    np.testing.assert_array_equal(ml, [[1, 1]])


def test_band_statistics_features() -> None:
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    f = band_statistics_features(x)
    assert f.shape == (2, 6)
    np.testing.assert_allclose(f[:, :3], x.reshape(2, 3, -1).mean(-1))
    np.testing.assert_allclose(f[:, 3:], x.reshape(2, 3, -1).std(-1), rtol=1e-6)

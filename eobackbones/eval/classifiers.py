"""Linear and kNN probes on frozen features, in torch (CPU or GPU)."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import multilabel_metrics, singlelabel_metrics

__all__ = ["DEFAULT_L2_GRID", "LinearProbe", "band_statistics_features", "fit_linear_probe", "knn_scores"]

DEFAULT_L2_GRID: tuple[float, ...] = tuple(10.0**e for e in range(-6, 2))  # 1e-6 .. 1e1


def band_statistics_features(images: np.ndarray) -> np.ndarray:
    """Per-band spatial mean and standard deviation, the no-backbone baseline.

    Args:
        images: (N, C, H, W) array; statistics are over the valid (non-NaN) pixels, NaN for an all-NaN band.

    Returns:
        (N, 2C) float32: C means followed by C standard deviations.
    """
    x = np.asarray(images, dtype=np.float64).reshape(*images.shape[:2], -1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # all-NaN bands: NaN is the honest answer
        return np.concatenate([np.nanmean(x, -1), np.nanstd(x, -1)], axis=1).astype(np.float32)


class LinearProbe:
    """Standardisation + logistic regression (softmax or one-vs-rest sigmoid).

    Attributes:
        weight: (K, D) weights on standardised features.
        bias: (K,) intercepts.
        mean: (D,) feature mean of the fit set.
        std: (D,) feature std of the fit set (1 where constant).
        multilabel: One-vs-rest sigmoid if True, else softmax.
        chosen_l2: L2 strength used for the final fit.
        val_scores: l2 -> validation metric of the sweep (empty when not swept).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 multilabel: bool, chosen_l2: float, val_scores: dict[float, float] | None = None) -> None:
        self.weight, self.bias, self.mean, self.std = weight, bias, mean, std
        self.multilabel = multilabel
        self.chosen_l2 = chosen_l2
        self.val_scores = val_scores or {}

    def logits(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=self.weight.dtype, device=self.weight.device)
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias

    @torch.no_grad()
    def predict_scores(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, K) probabilities: sigmoid per class (multi-label) or softmax (single-label)."""
        z = self.logits(x)
        p = torch.sigmoid(z) if self.multilabel else torch.softmax(z, dim=1)
        return p.cpu().numpy()


def _loss(z: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    # Mean over samples, summed over classes for one-vs-rest: each class is its own binary problem.
    if multilabel:
        return F.binary_cross_entropy_with_logits(z, y, reduction="sum") / len(z)
    return F.cross_entropy(z, y)


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, multilabel: bool, l2: float,
         max_iter: int, standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS from zero init (deterministic); the intercept is not penalised."""
    if standardize:
        mean = x.mean(0)
        std = x.std(0, unbiased=False)
        std = torch.where(std > 1e-12 * mean.abs().clamp_min(1.0), std, torch.ones_like(std))
    else:
        mean, std = torch.zeros_like(x[0]), torch.ones_like(x[0])
    xs = (x - mean) / std
    w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(xs @ w.T + b, y, multilabel) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def fit_linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    multilabel: bool,
    device: str | torch.device = "cpu",
    grid: Sequence[float] = DEFAULT_L2_GRID,
    num_classes: int | None = None,
    refit: bool = True,
    max_iter: int = 500,
    dtype: torch.dtype = torch.float64,
    c_grid: Sequence[float] | None = None,
    standardize: bool = True,
    select_metric: str | None = None,
    tie_break: str = "val_loss",
) -> LinearProbe:
    """Logistic-regression probe with the L2 strength chosen on the validation split.

    Objective: mean cross-entropy (softmax) or mean per-sample sum of per-class BCE (one-vs-rest)
    on features standardised with the fit set's mean/std, plus ``0.5 * l2 * ||W||^2``. This is
    sklearn's ``LogisticRegression`` with ``C = 1 / (n_samples * l2)``. Each grid value is fit
    on train and scored on val (accuracy, or macro mAP for multi-label; ties broken by lower
    validation loss, then by the larger ``l2``); with ``refit`` the chosen value is refit on
    train + val, so the test split is touched only once, by the caller.

    Args:
        x_train: (N, D) training features.
        y_train: (N,) int labels or (N, K) multi-hot.
        x_val: (M, D) validation features.
        y_val: Validation labels.
        multilabel: One-vs-rest sigmoid if True, else softmax.
        device: Torch device for the fits.
        grid: Candidate L2 strengths (a single value skips the sweep).
        num_classes: K for single-label (default: ``max label + 1``).
        refit: Refit on train + val with the chosen strength.
        max_iter: L-BFGS iterations per fit.
        dtype: Compute dtype (float64 keeps L-BFGS convergence tight).
        c_grid: sweep scikit-learn's ``C`` instead (``l2 = 1 / (C * n_fit)``, so a refit on more samples keeps
            ``C``, as torchgeo-bench does); ``chosen_l2`` then holds the chosen ``C``.
        standardize: standardise features with the fit set's statistics (False: raw features).
        select_metric: validation metric (default: ``accuracy`` / ``map_macro``).
        tie_break: ``val_loss`` (lower validation loss, then larger ``l2``) or ``smallest_c`` (strongest
            regularisation wins a tie, as torchgeo-bench's strict ``>``).
    """
    def t(a: np.ndarray, labels: bool = False) -> torch.Tensor:
        dt = (dtype if multilabel else torch.long) if labels else dtype
        return torch.as_tensor(np.asarray(a), device=device).to(dt)

    xtr, ytr, xva, yva = t(x_train), t(y_train, True), t(x_val), t(y_val, True)
    if multilabel:
        k = ytr.shape[1]
    else:
        k = num_classes or int(max(ytr.max().item(), yva.max().item() if len(yva) else 0)) + 1

    # each candidate as the l2 strength for n samples: l2 itself, or 1 / (C n) on a C grid
    if c_grid is not None:
        cands = sorted(float(c) for c in c_grid)
        strength = lambda c, n: 1.0 / (c * n)  # noqa: E731
    else:
        cands = sorted(float(g) for g in grid)
        strength = lambda l2, n: l2  # noqa: E731
    metric_name = select_metric or ("map_macro" if multilabel else "accuracy")
    val_scores: dict[float, float] = {}
    # default: the strongest regularisation (largest l2 / smallest C)
    best, best_key = (cands[0] if c_grid is not None else cands[-1]), None
    if len(cands) > 1:
        for c in cands:
            probe = LinearProbe(*_fit(xtr, ytr, k, multilabel, strength(c, len(xtr)), max_iter, standardize),
                                multilabel, c)
            with torch.no_grad():
                z = probe.logits(xva)
                val_loss = _loss(z, yva, multilabel).item()
            scores = probe.predict_scores(xva)
            fn = multilabel_metrics if multilabel else singlelabel_metrics
            metric = fn(y_val, scores)[metric_name]
            val_scores[c] = metric
            l2 = strength(c, len(xtr))
            key = (round(metric, 12), -val_loss, l2) if tie_break == "val_loss" else (round(metric, 12), l2)
            if best_key is None or key > best_key:
                best, best_key = c, key

    if refit:
        xtr, ytr = torch.cat([xtr, xva]), torch.cat([ytr, yva])
    return LinearProbe(*_fit(xtr, ytr, k, multilabel, strength(best, len(xtr)), max_iter, standardize),
                       multilabel, best, val_scores)


@torch.no_grad()
def knn_scores(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    k: int = 20,
    multilabel: bool = False,
    num_classes: int | None = None,
    temperature: float = 0.07,
    device: str | torch.device = "cpu",
    chunk: int = 1024,
    metric: str = "cosine",
) -> np.ndarray:
    """Cosine kNN probe with similarity-weighted votes.

    Each of the ``k`` nearest training samples (cosine similarity ``s``) votes with weight
    ``exp(s / temperature)`` (the weighting of Wu et al. 2018, used by DINO's kNN eval), so
    closer neighbours count more but all k contribute. Scores are the weighted fraction of
    neighbour votes per class: a distribution over classes (single-label) or per-class
    positive rates in [0, 1] (multi-label).

    Args:
        x_train: (N, D) features.
        y_train: (N,) int labels or (N, K) multi-hot.
        x_test: (M, D) features.
        k: Number of neighbours (capped at N).
        multilabel: Whether ``y_train`` is multi-hot.
        num_classes: K for single-label (default: ``max label + 1``).
        temperature: Softness of the vote weights.
        device: Torch device.
        chunk: Test rows per similarity block (bounds memory).
        metric: ``cosine`` (similarity-weighted votes) or ``l2`` (Euclidean distance on the raw features,
            uniform votes; torchgeo-bench's kNN).

    Returns:
        (M, K) float32 scores.
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be cosine or l2, got {metric!r}")
    xtr = torch.as_tensor(np.asarray(x_train), device=device).float()
    xte = torch.as_tensor(np.asarray(x_test), device=device).float()
    if metric == "cosine":
        xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    y = torch.as_tensor(np.asarray(y_train), device=device)
    if multilabel:
        votes = y.float()
    else:
        votes = F.one_hot(y.long(), num_classes or int(y.max().item()) + 1).float()
    k = min(k, len(xtr))
    out = []
    for start in range(0, len(xte), chunk):
        if metric == "l2":
            # uniform votes of the k nearest by Euclidean distance (ties: lowest training index first)
            d = torch.cdist(xte[start:start + chunk].double(), xtr.double())
            idx = torch.sort(d, dim=1, stable=True).indices[:, :k]
            out.append(votes[idx].mean(1))
            continue
        sim, idx = (xte[start:start + chunk] @ xtr.T).topk(k, dim=1)
        w = torch.exp((sim - sim[:, :1]) / temperature)  # shift by the max for stability; cancels below
        out.append((w[..., None] * votes[idx]).sum(1) / w.sum(1, keepdim=True))
    return torch.cat(out).cpu().numpy().astype(np.float32)

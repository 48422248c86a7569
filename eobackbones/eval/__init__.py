"""Linear-probe evaluation: metrics and probes on frozen features."""
from .classifiers import DEFAULT_L2_GRID, LinearProbe, band_statistics_features, fit_linear_probe, knn_scores
from .metrics import average_precision, bootstrap_ci, miou, multilabel_metrics, singlelabel_metrics

__all__ = [
    "DEFAULT_L2_GRID",
    "LinearProbe",
    "average_precision",
    "band_statistics_features",
    "bootstrap_ci",
    "fit_linear_probe",
    "knn_scores",
    "miou",
    "multilabel_metrics",
    "singlelabel_metrics",
]

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

# linear-probe benchmark (eobackbones probe): features, torchgeo adapters, report
from .datasets_torchgeo import TORCHGEO_DATASETS, load_torchgeo
from .features import InputPlan, NormalisationError, amp_dtype, extract_features, plan_inputs
from .linear_probe import (
    add_probe_args, fit_segmentation_probe, main_probe, probe_features, run_probe, segmentation_probe)
from .report import plot_report, to_markdown, write_report

__all__ += [
    "InputPlan",
    "NormalisationError",
    "TORCHGEO_DATASETS",
    "add_probe_args",
    "amp_dtype",
    "extract_features",
    "fit_segmentation_probe",
    "load_torchgeo",
    "main_probe",
    "plan_inputs",
    "plot_report",
    "probe_features",
    "run_probe",
    "segmentation_probe",
    "to_markdown",
    "write_report",
]

"""Linear-probe evaluation: metrics, probes on frozen features, the probe command."""
from .classifiers import DEFAULT_L2_GRID, LinearProbe, band_statistics_features, fit_linear_probe, knn_scores
from .features import InputPlan, amp_dtype, extract_features, plan_inputs, seg_feature_index
from .linear_probe import (
    PROTOCOLS, ProbeProtocol, add_probe_args, build_for_data, fit_segmentation_probe, main_probe, probe_features,
    run_probe, segmentation_probe, validate_probe_args)
from .metrics import average_precision, bootstrap_ci, miou, multilabel_metrics, singlelabel_metrics
from .report import plot_report, to_markdown, write_report

__all__ = [
    'DEFAULT_L2_GRID', 'LinearProbe', 'average_precision', 'band_statistics_features', 'bootstrap_ci',
    'fit_linear_probe', 'knn_scores', 'miou', 'multilabel_metrics', 'singlelabel_metrics', 'InputPlan', 'amp_dtype',
    'extract_features', 'plan_inputs', 'seg_feature_index', 'PROTOCOLS', 'ProbeProtocol', 'add_probe_args',
    'build_for_data', 'fit_segmentation_probe', 'main_probe', 'probe_features', 'run_probe', 'segmentation_probe',
    'validate_probe_args', 'plot_report', 'to_markdown', 'write_report',
]

"""Probe datasets: in-memory :class:`ProbeData` plus loaders."""
from .datasets import (
    SPLITS,
    ProbeData,
    load_bigearthnet_mini,
    load_folder,
    nan_policy,
    subsample_labels,
)

__all__ = ["SPLITS", "ProbeData", "load_bigearthnet_mini", "load_folder", "nan_policy", "subsample_labels"]

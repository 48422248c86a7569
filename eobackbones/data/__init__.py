"""Probe datasets: in-memory :class:`ProbeData`, the embedded real samples, folder / torchgeo adapters, the table."""
from .catalog import DATASETS, DataRequest, DatasetAdapter, list_datasets, load_dataset, register_dataset
from .datasets import SPLITS, ProbeData, load_bigearthnet_mini, load_folder, nan_policy, subsample_labels
from .torchgeo import TORCHGEO_DATASETS, load_torchgeo

__all__ = ['SPLITS', 'ProbeData', 'load_bigearthnet_mini', 'load_folder', 'nan_policy', 'subsample_labels',
           'DATASETS', 'DataRequest', 'DatasetAdapter', 'list_datasets', 'load_dataset', 'register_dataset',
           'TORCHGEO_DATASETS', 'load_torchgeo']

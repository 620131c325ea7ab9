"""Benchmark and custom semantic-segmentation datasets for ``ovss evaluate``."""
from __future__ import annotations

from .classes import benchmark_class_names, parse_class_names, read_class_names
from .dataset import Sample, SemSegDataset, select_indices
from .labels import read_label
from .loader import dataset_root, generic_dataset, get_spec, list_datasets, open_dataset
from .specs import DATASETS, DatasetSpec

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "Sample",
    "SemSegDataset",
    "benchmark_class_names",
    "dataset_root",
    "generic_dataset",
    "get_spec",
    "list_datasets",
    "open_dataset",
    "parse_class_names",
    "read_class_names",
    "read_label",
    "select_indices",
]

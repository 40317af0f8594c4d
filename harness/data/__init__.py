"""Data layer: datasets in their official on-disk formats -> `ArrayData` (original class ids), transforms."""
from harness.data.base import ArrayData, DatasetInfo, cache_dir, default_data_dir
from harness.data.registry import DATASETS, dataset_info, load_dataset
from harness.data.transforms import TaskDataset, build_transform
from harness.data.checks import check_dataset, dataset_fingerprint

__all__ = ["ArrayData", "DatasetInfo", "DATASETS", "dataset_info", "load_dataset", "build_transform",
           "TaskDataset", "cache_dir", "default_data_dir", "check_dataset", "dataset_fingerprint"]

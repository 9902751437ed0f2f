"""Datasets for training: what a dataset is (specs.py), the start-up check of its files
(checks.py), loading it (load.py) and its reproducible batches (splits.py).

`dataset_spec` describes a dataset (shape, classes, normalisation) without touching any file,
so every rank can build its model from it; `validate_data` checks the files cheaply at
start-up; `load_datasets` returns the train and test `Split`s.
"""

from pipemlaan.data.checks import validate_data
from pipemlaan.data.load import load_datasets
from pipemlaan.data.specs import FASHION_MNIST_ROOT, DatasetSpec, data_root, dataset_spec
from pipemlaan.data.splits import FolderSplit, Split, TensorSplit

__all__ = ["DatasetSpec", "FASHION_MNIST_ROOT", "FolderSplit", "Split", "TensorSplit",
           "data_root", "dataset_spec", "load_datasets", "validate_data"]

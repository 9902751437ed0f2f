"""What a dataset is, without touching a file: shape, classes, normalisation, augmentation,
where its files live. Every rank builds its model from a `DatasetSpec`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from pipemlaan.config import DataConfig
from pipemlaan.errors import ConfigError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    in_channels: int
    image_size: tuple[int, int]  # (H, W)
    num_classes: int
    mean: tuple[float, ...]  # per channel, the normalisation used
    std: tuple[float, ...]


_SPECS = {
    "fashion_mnist": DatasetSpec("fashion_mnist", 1, (28, 28), 10, (0.2860,), (0.3530,)),
    "cifar10": DatasetSpec("cifar10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616)),
    "svhn": DatasetSpec("svhn", 3, (32, 32), 10, (0.4377, 0.4438, 0.4728),
                        (0.1980, 0.2010, 0.1970)),
    "stl10": DatasetSpec("stl10", 3, (96, 96), 10, (0.4467, 0.4398, 0.4066),
                         (0.2603, 0.2566, 0.2713)),
    "imagenet": DatasetSpec("imagenet", 3, (224, 224), 1000, (0.485, 0.456, 0.406),
                            (0.229, 0.224, 0.225)),
}

# (augmentation, reflect padding): digits (SVHN) must not be mirrored, so they only get a crop.
_AUGMENT = {
    "fashion_mnist": ("crop_flip", 2),
    "cifar10": ("crop_flip", 4),
    "svhn": ("crop", 4),
    "stl10": ("crop_flip", 12),
}

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES, _IDX_LABELS = 2051, 2049

# Files torchvision checks for, relative to the dataset root; STL-10 sizes are fixed so a
# truncated download is caught at start-up instead of deep inside numpy.
_TV_FILES = {
    "cifar10": {f"cifar-10-batches-py/{n}": None for n in
                ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]},
    "svhn": {"train_32x32.mat": None, "test_32x32.mat": None},
    "stl10": {"stl10_binary/train_X.bin": 5000 * 3 * 96 * 96, "stl10_binary/train_y.bin": 5000,
              "stl10_binary/test_X.bin": 8000 * 3 * 96 * 96, "stl10_binary/test_y.bin": 8000},
}

_SYNTHETIC_CLASSES = 10
# Fixed so the synthetic task is the same whatever train.seed is: only the model and the data
# order should change with the seed.
_SYNTHETIC_SEED = 20240601
_SYNTHETIC_NOISE = 1.5

# Tags that keep the order stream and the augmentation stream apart for equal (seed, epoch).
_ORDER, _AUGMENTATION = 1, 2
# The stream of data.train_subset / data.test_subset draws: fixed, so a subset holds the same
# samples whatever train.seed is (a seed study then varies the weights and the order only).
_SUBSET = 3


def dataset_spec(cfg: DataConfig) -> DatasetSpec:
    """The spec of `cfg.name`, computed without reading any file."""
    if cfg.name == "synthetic":
        c, h, w = (int(v) for v in cfg.synthetic_image)
        return DatasetSpec("synthetic", c, (h, w), _SYNTHETIC_CLASSES, (0.0,) * c, (1.0,) * c)
    if cfg.name not in _SPECS:
        raise ConfigError(f"data.name={cfg.name!r} is unknown; use one of "
                          f"{', '.join(list(_SPECS) + ['synthetic'])}")
    return _SPECS[cfg.name]


def data_root(cfg: DataConfig) -> Path:
    """The folder the dataset is read from: `cfg.root`, or the dataset's default."""
    if cfg.root:
        return Path(cfg.root)
    return Path(FASHION_MNIST_ROOT if cfg.name == "fashion_mnist" else f"data/{cfg.name}")

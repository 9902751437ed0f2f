"""Loading a dataset into its train and test `Split`s: Fashion-MNIST's IDX files, the
torchvision datasets, ImageNet folders, the synthetic task."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipemlaan.config import DataConfig
from pipemlaan.errors import ConfigError, DataError
from pipemlaan.data.checks import _idx_file, _torchvision_fix, _where, validate_data
from pipemlaan.data.specs import (_AUGMENT, _FASHION_FILES, _IDX_IMAGES, _IDX_LABELS,
                                  _SYNTHETIC_NOISE, _SYNTHETIC_SEED, DatasetSpec, data_root,
                                  dataset_spec)
from pipemlaan.data.splits import (FolderSplit, Split, TensorSplit, _generator,
                                   stratified_subset)


def load_datasets(cfg: DataConfig, device: torch.device | str = "cpu"
                  ) -> tuple[Split, Split, DatasetSpec]:
    """(train, test, spec) for `cfg`, with the data on `device` (ImageNet: batches on it)."""
    spec = dataset_spec(cfg)
    validate_data(cfg)
    root = data_root(cfg)
    if cfg.name == "imagenet":
        if cfg.decode == "gpu" and torch.device(device).type != "cuda":
            raise ConfigError(f"data.decode=gpu decodes JPEGs on the GPU but this rank runs on "
                              f"{torch.device(device).type}; set data.decode=cpu or run on CUDA "
                              f"(train.device=cuda)")
        train = FolderSplit(root / "train", spec, cfg.augment, device, cfg.workers,
                            cfg.train_subset, cfg.decode)
        test = FolderSplit(root / "val", spec, False, device, cfg.workers, cfg.test_subset,
                           cfg.decode)
        return train, test, spec
    if cfg.name == "synthetic":
        (xtr, ytr), (xte, yte) = _synthetic(cfg, spec)
        augment, pad = None, 4
    else:
        if cfg.name == "fashion_mnist":
            (xtr, ytr), (xte, yte) = (_load_fashion_mnist(root, s) for s in ("train", "test"))
        else:
            (xtr, ytr), (xte, yte) = (_load_torchvision(cfg, root, t) for t in (True, False))
        augment, pad = _AUGMENT[cfg.name] if cfg.augment else (None, 4)
    for labels in (ytr, yte):
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < spec.num_classes:
            raise DataError(f"{_where(root)}: labels outside 0..{spec.num_classes - 1}; "
                            f"the files are not {cfg.name}, replace them")
    xtr, ytr = _subset(xtr, ytr, cfg.train_subset)
    xte, yte = _subset(xte, yte, cfg.test_subset)
    train = TensorSplit(xtr, ytr, spec, augment, device, pad=pad)
    test = TensorSplit(xte, yte, spec, None, device)
    return train, test, spec


def _subset(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n <= 0 or n >= len(y):
        return x, y
    keep = stratified_subset(y, n)
    return x[keep], y[keep]


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: unreadable ({e}); replace the file and check "
                        f"data.root={str(path.parent)!r}") from None
    ndim = magic & 0xFF
    offset = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:offset])
    if len(raw) != offset + int(np.prod(dims)):
        raise DataError(f"{path}: {len(raw)} bytes where the header promises "
                        f"{offset + int(np.prod(dims))}; replace the file "
                        f"(data.root={str(path.parent)!r})")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _load_fashion_mnist(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _FASHION_FILES[split]
    x = _read_idx(_idx_file(root, images), _IDX_IMAGES)
    y = _read_idx(_idx_file(root, labels), _IDX_LABELS)
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def _load_torchvision(cfg: DataConfig, root: Path, train: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    try:
        if cfg.name == "cifar10":
            ds = datasets.CIFAR10(str(root), train=train, download=cfg.download)
            # CIFAR-10 is stored channels-last (N, H, W, C).
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            y = torch.tensor(ds.targets, dtype=torch.int64)
        else:
            cls = datasets.SVHN if cfg.name == "svhn" else datasets.STL10
            ds = cls(str(root), split="train" if train else "test", download=cfg.download)
            x = torch.from_numpy(ds.data)
            y = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
    except ImportError as e:
        raise DataError(f"loading {cfg.name} needs a missing module ({e}); pip install it"
                        ) from None
    except (RuntimeError, OSError, ValueError, EOFError) as e:
        raise DataError(f"could not load {cfg.name} ({str(e).splitlines()[0] if str(e) else e!r}); "
                        f"{_torchvision_fix(cfg, root)}") from None
    return x, y


def _synthetic(cfg: DataConfig, spec: DatasetSpec):
    """Class prototypes (smooth random images) plus pixel noise: learnable by a small CNN."""
    c, (h, w) = spec.in_channels, spec.image_size
    gen = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    coarse = torch.randn(spec.num_classes, c, 4, 4, generator=gen)
    protos = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    protos = (protos - protos.mean(dim=(1, 2, 3), keepdim=True)) / protos.std(
        dim=(1, 2, 3), keepdim=True)

    def draw(n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A stream per split, so the test set does not move when synthetic_size changes.
        g = _generator(_SYNTHETIC_SEED, stream)
        y = torch.randint(0, spec.num_classes, (n,), generator=g)
        noise = torch.randn(n, c, h, w, generator=g)
        # Divided so pixels have roughly unit variance, matching the spec's mean 0 / std 1.
        x = (protos[y] + _SYNTHETIC_NOISE * noise) / (1 + _SYNTHETIC_NOISE**2) ** 0.5
        return x, y

    n_train = int(cfg.synthetic_size)
    return draw(n_train, 0), draw(max(256, n_train // 4), 1)

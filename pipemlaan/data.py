"""Datasets for training: file checks, loading, and reproducible batches.

`dataset_spec` describes a dataset (shape, classes, normalisation) without touching any file,
so every rank can build its model from it. `validate_data` is the cheap start-up check of the
files; `load_datasets` returns the train and test `Split`s. A split yields normalised float32
batches on its device; the training order and the augmentation of batch b depend only on
(seed, epoch, b), so a run resumed at batch b sees exactly the batches of an uninterrupted one.

Small datasets (Fashion-MNIST, CIFAR-10, SVHN, STL-10, synthetic) live whole on the training
device as a `TensorSplit` and are augmented batch-wise there; ImageNet is read from disk by a
`FolderSplit` through DataLoader workers.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipemlaan.config import DataConfig
from pipemlaan.errors import ConfigError, DataError


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


# ---------------------------------------------------------------------------------------------
# Splits


def _mix(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (splitmix64 style), for torch.Generator."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & mask)) * 0xBF58476D1CE4E5B9) & mask
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & mask
        h ^= h >> 29
    return h >> 1


def _generator(*parts: int) -> torch.Generator:
    # Always a CPU generator: the same seed then gives the same draws on every device.
    return torch.Generator().manual_seed(_mix(*parts))


def _shard_bounds(n: int, shard: tuple[int, int]) -> tuple[int, int]:
    r, parts = shard
    if not 0 <= r < parts:
        raise ValueError(f"shard {r} of {parts} does not exist")
    return r * n // parts, (r + 1) * n // parts


class Split:
    """One split of a dataset: `num_samples` samples served as reproducible batches."""

    num_samples: int
    spec: DatasetSpec
    device: torch.device

    def num_batches(self, batch_size: int, drop_last: bool) -> int:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if drop_last:
            return self.num_samples // batch_size
        return -(-self.num_samples // batch_size)

    def batches(self, batch_size: int, *, epoch: int, seed: int, train: bool,
                start: int = 0, shard: tuple[int, int] = (0, 1),
                every: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields (images, labels) batches from batch `start` on.

        train=True: the (seed, epoch) permutation, full batches only, augmentation on (when the
        split has one). train=False: dataset order, a final partial batch, no augmentation.
        shard=(r, D): only the r-th of D equal slices of every batch, with exactly the pixels
        (augmentation included) that slice has in the whole batch (data-parallel replicas).
        every=(r, D): only batches r, r+D, r+2D, ... (replicas sharing out the test set).
        """
        raise NotImplementedError

    def _order(self, batch_size: int, epoch: int, seed: int, train: bool, start: int,
               every: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, range]:
        """The sample order of the epoch and the batch numbers still to serve."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if train:
            order = torch.randperm(self.num_samples, generator=_generator(_ORDER, seed, epoch))
        else:
            order = torch.arange(self.num_samples)
        r, parts = every
        first = start + (r - start) % parts
        return order, range(first, self.num_batches(batch_size, drop_last=train), parts)


class TensorSplit(Split):
    """A dataset held whole on the training device, augmented batch-wise with tensor ops.

    `images` is (N, C, H, W): uint8 pixels (scaled by 1/255 before normalising) or floats
    (normalised as they are). `augment` is None, "crop" or "crop_flip"; `pad` is the reflect
    padding of the random crop.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec,
                 augment: str | None = None, device: torch.device | str = "cpu", *,
                 pad: int = 4):
        if augment not in (None, "crop", "crop_flip"):
            raise ValueError(f"augment must be None, 'crop' or 'crop_flip', got {augment!r}")
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images (N, C, H, W) and labels (N,) disagree: "
                             f"{tuple(images.shape)} vs {tuple(labels.shape)}")
        if augment and not 0 < pad < min(images.shape[2:]):
            raise ValueError(f"pad={pad} must lie between 1 and the image side - 1")
        self.device = torch.device(device)
        self.spec = spec
        self.augment = augment
        self.pad = pad
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.num_samples = int(images.shape[0])
        self._scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        self._mean = torch.tensor(spec.mean, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(spec.std, device=self.device).view(1, -1, 1, 1)

    def batches(self, batch_size: int, *, epoch: int, seed: int, train: bool,
                start: int = 0, shard: tuple[int, int] = (0, 1),
                every: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, todo = self._order(batch_size, epoch, seed, train, start, every)
        order = order.to(self.device)
        for b in todo:
            whole = order[b * batch_size:(b + 1) * batch_size]
            lo, hi = _shard_bounds(len(whole), shard)
            idx = whole[lo:hi]
            x = self._normalise(self.images[idx])
            if train and self.augment:
                x = self._augmented(x, _generator(_AUGMENTATION, seed, epoch, b), len(whole), lo)
            yield x, self.labels[idx]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) * self._scale
        return (x - self._mean) / self._std

    def _augmented(self, x: torch.Tensor, gen: torch.Generator, whole: int,
                   offset: int) -> torch.Tensor:
        # Normalising is per-channel affine, so cropping and flipping after it gives the same
        # pixels as before it, and the reflect padding can work on floats. The random draws are
        # made for the whole batch (`whole` samples) and this slice takes its own from `offset`.
        n, c, h, w = x.shape
        p = self.pad
        mine = slice(offset, offset + n)
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        dy = torch.randint(0, 2 * p + 1, (whole,), generator=gen)[mine].to(self.device)
        dx = torch.randint(0, 2 * p + 1, (whole,), generator=gen)[mine].to(self.device)
        rows = dy[:, None] + torch.arange(h, device=self.device)  # (n, h)
        cols = dx[:, None] + torch.arange(w, device=self.device)  # (n, w)
        x = padded[torch.arange(n, device=self.device)[:, None, None, None],
                   torch.arange(c, device=self.device)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
        if self.augment == "crop_flip":
            flip = (torch.rand(whole, generator=gen)[mine] < 0.5).to(self.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


class _SeededImages(torch.utils.data.Dataset):
    """ImageFolder samples keyed by (index, augmentation seed or None).

    Seeding the random transform per sample from (seed, epoch, batch, position) makes a resumed
    epoch repeat the crops of an uninterrupted one, whatever worker serves the sample.
    """

    def __init__(self, folder, train_transform, eval_transform):
        self.folder = folder
        self.train_transform = train_transform
        self.eval_transform = eval_transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int | None]):
        index, aug_seed = key
        path, target = self.folder.samples[index]
        image = self.folder.loader(path)
        if aug_seed is None:
            return self.eval_transform(image), target
        # fork_rng: with workers=0 this runs in the training process, whose RNG must not move.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            return self.train_transform(image), target


class FolderSplit(Split):
    """An ImageFolder tree (one sub-folder per class) read through DataLoader workers."""

    def __init__(self, folder: str | Path, spec: DatasetSpec, augment: bool,
                 device: torch.device | str = "cpu", workers: int = 4, subset: int = 0):
        from torchvision import datasets, transforms

        try:
            images = datasets.ImageFolder(str(folder))
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"{folder}: no class folders with images ({e}); point data.root at "
                            f"an ImageNet tree with train/<class>/*.JPEG and val/<class>/*.JPEG"
                            ) from None
        normalise = transforms.Normalize(spec.mean, spec.std)
        size = spec.image_size[0]
        train_tf = transforms.Compose([transforms.RandomResizedCrop(size),
                                       transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), normalise])
        eval_tf = transforms.Compose([transforms.Resize(size * 256 // 224),
                                      transforms.CenterCrop(size),
                                      transforms.ToTensor(), normalise])
        self.dataset = _SeededImages(images, train_tf, eval_tf)
        self.spec = spec
        self.augment = augment
        self.device = torch.device(device)
        self.workers = workers
        self.num_samples = min(len(images), subset) if subset > 0 else len(images)

    def batches(self, batch_size: int, *, epoch: int, seed: int, train: bool,
                start: int = 0, shard: tuple[int, int] = (0, 1),
                every: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, todo = self._order(batch_size, epoch, seed, train, start, every)
        augment = train and self.augment
        plan = []
        for b in todo:
            idx = order[b * batch_size:(b + 1) * batch_size].tolist()
            lo, hi = _shard_bounds(len(idx), shard)
            plan.append([(i, _mix(_AUGMENTATION, seed, epoch, b, k) if augment else None)
                         for k, i in enumerate(idx)][lo:hi])
        if not plan:
            return
        cuda = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=plan,
                                             num_workers=self.workers, pin_memory=cuda)
        for x, y in loader:
            yield x.to(self.device, non_blocking=cuda), y.to(self.device, non_blocking=cuda)


# ---------------------------------------------------------------------------------------------
# Checks


def validate_data(cfg: DataConfig) -> None:
    """Checks that the dataset's files exist and look well-formed, without loading them."""
    if cfg.name == "synthetic":
        return
    dataset_spec(cfg)  # unknown names fail here, as a ConfigError
    root = data_root(cfg)
    if cfg.name == "fashion_mnist":
        _validate_fashion_mnist(root)
    elif cfg.name == "imagenet":
        _validate_imagenet(root)
    else:
        _validate_torchvision(cfg, root)


def _where(root: Path) -> str:
    return f"data.root={str(root)!r}"


def _fashion_fix() -> str:
    return ("install it with `apt-get install dataset-fashion-mnist` or point data.root at a "
            "folder holding the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, gzipped or not)")


def _idx_file(root: Path, stem: str) -> Path:
    for path in (root / f"{stem}.gz", root / stem):
        if path.is_file():
            return path
    raise DataError(f"{_where(root)} has no {stem}(.gz); {_fashion_fix()}")


def _idx_header(path: Path) -> tuple[int, tuple[int, ...], int]:
    """(magic, dims, uncompressed file size) read from the first bytes of an IDX file.

    For .gz the size comes from the gzip trailer (modulo 2**32), so nothing is decompressed
    beyond the header.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{path} is empty or truncated; replace it and check "
                                f"data.root={str(path.parent)!r}")
            magic = struct.unpack(">I", head)[0]
            ndim = magic & 0xFF
            raw = f.read(4 * ndim)
        if len(raw) < 4 * ndim:
            raise DataError(f"{path}: truncated IDX header; replace the file and check "
                            f"data.root={str(path.parent)!r}")
        dims = struct.unpack(f">{ndim}I", raw)
        if path.suffix == ".gz":
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                size = struct.unpack("<I", f.read(4))[0]
        else:
            size = path.stat().st_size
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: unreadable ({e}); replace the file and check "
                        f"data.root={str(path.parent)!r}") from None
    return magic, dims, size


def _check_idx(path: Path, magic: int, tail_dims: tuple[int, ...]) -> int:
    """Checks an IDX header against the expected magic and item shape; returns the count."""
    got, dims, size = _idx_header(path)
    where = f"data.root={str(path.parent)!r}"
    if got != magic:
        raise DataError(f"{path}: IDX magic number {got} where {magic} was expected; this is not "
                        f"a Fashion-MNIST {'image' if magic == _IDX_IMAGES else 'label'} file, "
                        f"fix {where}")
    if tuple(dims[1:]) != tail_dims:
        raise DataError(f"{path}: items of shape {tuple(dims[1:])} where {tail_dims} was "
                        f"expected; fix {where}")
    expected = 4 + 4 * len(dims) + int(np.prod(dims))
    if path.suffix == ".gz":
        expected %= 2**32  # the gzip trailer stores the size modulo 2**32
    if size != expected:
        raise DataError(f"{path}: {size} bytes where the header promises {expected}; the file "
                        f"is truncated or corrupt, replace it ({where})")
    return dims[0]


def _validate_fashion_mnist(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder {_where(root)} does not exist; {_fashion_fix()}")
    h, w = _SPECS["fashion_mnist"].image_size
    for split, (images, labels) in _FASHION_FILES.items():
        n_images = _check_idx(_idx_file(root, images), _IDX_IMAGES, (h, w))
        n_labels = _check_idx(_idx_file(root, labels), _IDX_LABELS, ())
        if n_images != n_labels:
            raise DataError(f"{_where(root)}: the {split} split has {n_images} images but "
                            f"{n_labels} labels; the files belong to different sets, replace "
                            f"them")


def _validate_imagenet(root: Path) -> None:
    missing = [d for d in ("train", "val") if not (root / d).is_dir()]
    if missing:
        lacks = " and ".join(m + "/" for m in missing)
        raise DataError(f"ImageNet folder {_where(root)} lacks {lacks}; "
                        f"point data.root at a folder holding train/<class>/*.JPEG and "
                        f"val/<class>/*.JPEG")


def _torchvision_fix(cfg: DataConfig, root: Path) -> str:
    return (f"put the torchvision-format {cfg.name} files under {_where(root)} "
            f"or set data.download=true")


def _validate_torchvision(cfg: DataConfig, root: Path) -> None:
    if cfg.name == "svhn":
        try:
            import scipy.io  # noqa: F401  (torchvision reads SVHN's .mat files with it)
        except ImportError:
            raise DataError("SVHN is stored as .mat files that need scipy; "
                            "run `pip install scipy`") from None
    if cfg.download:
        return  # torchvision fetches what is missing at load time
    for rel, size in _TV_FILES[cfg.name].items():
        path = root / rel
        if not path.is_file():
            raise DataError(f"{path} not found; {_torchvision_fix(cfg, root)}")
        if size is not None and path.stat().st_size != size:
            raise DataError(f"{path}: {path.stat().st_size} bytes where {size} were expected; "
                            f"replace the file under {_where(root)} or delete it and set "
                            f"data.download=true")


# ---------------------------------------------------------------------------------------------
# Loading


def load_datasets(cfg: DataConfig, device: torch.device | str = "cpu"
                  ) -> tuple[Split, Split, DatasetSpec]:
    """(train, test, spec) for `cfg`, with the data on `device` (ImageNet: batches on it)."""
    spec = dataset_spec(cfg)
    validate_data(cfg)
    root = data_root(cfg)
    if cfg.name == "imagenet":
        train = FolderSplit(root / "train", spec, cfg.augment, device, cfg.workers,
                            cfg.train_subset)
        test = FolderSplit(root / "val", spec, False, device, cfg.workers, cfg.test_subset)
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
    xtr, ytr = _first(xtr, ytr, cfg.train_subset)
    xte, yte = _first(xte, yte, cfg.test_subset)
    train = TensorSplit(xtr, ytr, spec, augment, device, pad=pad)
    test = TensorSplit(xte, yte, spec, None, device)
    return train, test, spec


def _first(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (x[:n], y[:n]) if n > 0 else (x, y)


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

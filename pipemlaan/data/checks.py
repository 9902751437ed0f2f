"""The cheap start-up check of a dataset's files (they exist, IDX headers and sizes are
well-formed), before anything is loaded; each failure is one line naming the fix."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from pipemlaan.config import DataConfig
from pipemlaan.errors import DataError
from pipemlaan.data.specs import (_FASHION_FILES, _IDX_IMAGES, _IDX_LABELS, _SPECS, _TV_FILES,
                                  data_root, dataset_spec)


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

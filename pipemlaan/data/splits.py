"""Reproducible batches: a `Split` yields normalised float32 batches on its device; the training
order and the augmentation of batch b depend only on (seed, epoch, b), so a run resumed at batch b
sees exactly the batches of an uninterrupted one. Small datasets live whole on the device as a
`TensorSplit` and are augmented batch-wise there; ImageNet is read from disk by a `FolderSplit`
through DataLoader workers."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from pipemlaan.errors import DataError
from pipemlaan.data.specs import _AUGMENTATION, _ORDER, DatasetSpec


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

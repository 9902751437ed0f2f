"""Reproducible batches: a `Split` yields normalised float32 batches on its device; the training
order and the augmentation of batch b depend only on (seed, epoch, b), so a run resumed at batch b
sees exactly the batches of an uninterrupted one. Small datasets live whole on the device as a
`TensorSplit` and are augmented batch-wise there; ImageNet is read from disk by a `FolderSplit`
through DataLoader workers that live as long as the split (data.workers), decoding JPEGs on the
CPU in the workers or, with data.decode=gpu, on the training device in batches.
`stratified_subset` draws data.train_subset / data.test_subset class by class."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from pipemlaan.errors import DataError
from pipemlaan.data.specs import _AUGMENTATION, _ORDER, _SUBSET, DatasetSpec


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


def stratified_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """The ascending indices of `n` samples drawn class by class (data.train_subset and
    data.test_subset): each class keeps its share of the dataset (largest remainders) and, when
    n is at least the number of classes, at least one sample. Which samples a class gives is a
    seeded draw of its own, fixed whatever train.seed is. n <= 0 or n >= len(labels): all."""
    total = len(labels)
    if n <= 0 or n >= total:
        return torch.arange(total)
    labels = labels.cpu()
    classes, counts = torch.unique(labels, return_counts=True)
    exact = [n * int(c) / total for c in counts]
    quota = [int(e) for e in exact]
    by_remainder = sorted(range(len(quota)), key=lambda k: (quota[k] - exact[k], k))
    for k in by_remainder[:n - sum(quota)]:
        quota[k] += 1
    if n >= len(quota):
        for k in range(len(quota)):
            if quota[k] == 0:      # a rare class: one sample from the class with the most
                donor = max(range(len(quota)), key=lambda j: (quota[j], -j))
                quota[donor] -= 1
                quota[k] += 1
    picked = []
    for k, c in enumerate(classes.tolist()):
        members = torch.nonzero(labels == c).flatten()
        draw = torch.randperm(len(members), generator=_generator(_SUBSET, int(c)))
        picked.append(members[draw[:quota[k]]])
    return torch.cat(picked).sort().values


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
    """ImageFolder samples keyed by (index, augmentation seed or None); `indices` maps the
    split's sample numbers to the folder's (a subset).

    Seeding the random transform per sample from (seed, epoch, batch, position) makes a resumed
    epoch repeat the crops of an uninterrupted one, whatever worker serves the sample.
    decode=cpu: the worker decodes and transforms (PIL), returning the normalised image;
    decode=gpu: the worker only reads the file's bytes, and `_GpuDecoder` does the rest.
    """

    def __init__(self, folder, indices: list[int], train_transform, eval_transform,
                 raw: bool = False):
        self.folder = folder
        self.indices = indices
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.raw = raw

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int | None]):
        index, aug_seed = key
        path, target = self.folder.samples[self.indices[index]]
        if self.raw:
            from torchvision.io import read_file
            return read_file(path), target, aug_seed
        image = self.folder.loader(path)
        if aug_seed is None:
            return self.eval_transform(image), target
        # fork_rng: with workers=0 this runs in the training process, whose RNG must not move.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            return self.train_transform(image), target


def _packed(samples):
    """decode=gpu: a batch's files, of different lengths, packed into one byte tensor and their
    lengths (one shared-memory block to hand over, and to pin, instead of one per file)."""
    data, targets, seeds = zip(*samples)
    return (torch.cat(data), torch.tensor([len(d) for d in data]), torch.tensor(targets),
            list(seeds))


class _GpuDecoder:
    """decode=gpu: a batch of JPEG files decoded at once by torchvision.io.decode_jpeg on the
    split's device, then cropped, flipped and normalised there. The crop boxes and flips are
    drawn from the same per-sample seeds, in the same order, as the CPU transforms', so both
    paths cut the same boxes; the pixels differ only by the resampling (tensor resize with
    antialiasing against PIL's), and the CPU path stays the reference."""

    def __init__(self, spec: DatasetSpec, device: torch.device):
        self.size = spec.image_size[0]
        self.device = device
        self.mean = torch.tensor(spec.mean, device=device).view(-1, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(-1, 1, 1)

    def __call__(self, data: list[torch.Tensor], seeds: list[int | None]) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms.v2 import functional as TF

        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            # a file that is not a baseline JPEG (ImageNet holds a few PNG and CMYK ones):
            # decode the batch one by one, such files on the CPU
            images = []
            for d in data:
                try:
                    images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    images.append(decode_image(d, mode=ImageReadMode.RGB).to(self.device))
        out = []
        for image, seed in zip(images, seeds):
            if seed is None:
                image = TF.resize(image, [self.size * 256 // 224], antialias=True)
                image = TF.center_crop(image, [self.size, self.size])
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    box = RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                    flip = bool(torch.rand(1) < 0.5)
                image = TF.resized_crop(image, *box, [self.size, self.size], antialias=True)
                if flip:
                    image = image.flip(-1)
            out.append(image)
        x = torch.stack(out).float().div_(255)
        return (x - self.mean) / self.std


class _Plan:
    """The batch sampler of a split's DataLoader: the batches of the current pass, replaced
    before each pass. The sampler is read in the training process, so one loader, and its
    workers, serve every run of steps and every evaluation of the run."""

    def __init__(self):
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FolderSplit(Split):
    """An ImageFolder tree (one sub-folder per class) read through DataLoader workers.

    The workers start at the first pass and persist (with prefetching, and pinned memory on
    CUDA) until the split is freed; one pass at a time: a new `batches` call ends the previous
    pass. decode="gpu" decodes JPEGs on the split's device (`_GpuDecoder`); data.decode=gpu
    needs a CUDA device (checked at start-up), tests run it on the CPU.
    """

    def __init__(self, folder: str | Path, spec: DatasetSpec, augment: bool,
                 device: torch.device | str = "cpu", workers: int = 4, subset: int = 0,
                 decode: str = "cpu"):
        from torchvision import datasets, transforms

        if decode not in ("cpu", "gpu"):
            raise ValueError(f"decode must be 'cpu' or 'gpu', got {decode!r}")
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
        indices = stratified_subset(torch.tensor(images.targets), subset).tolist()
        self.spec = spec
        self.augment = augment
        self.device = torch.device(device)
        self.workers = workers
        self.decode = decode
        self.dataset = _SeededImages(images, indices, train_tf, eval_tf, raw=decode == "gpu")
        self.num_samples = len(indices)
        self._decoder = _GpuDecoder(spec, self.device) if decode == "gpu" else None
        self._plan = _Plan()
        self._loader = None
        self._pass = 0

    def _make_loader(self) -> torch.utils.data.DataLoader:
        cuda = self.device.type == "cuda"
        more = dict(persistent_workers=True, prefetch_factor=4) if self.workers > 0 else {}
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self._plan, num_workers=self.workers, pin_memory=cuda,
            collate_fn=_packed if self.decode == "gpu" else None, **more)

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
        self._pass += 1
        mine = self._pass
        self._plan.batches = plan
        if self._loader is None:
            self._loader = self._make_loader()
        cuda = self.device.type == "cuda"
        for got in self._loader:
            if self._pass != mine:
                return          # a newer pass took the workers over: this one has ended
            if self._decoder is not None:
                packed, lengths, y, seeds = got
                x = self._decoder(list(packed.split(lengths.tolist())), seeds)
            else:
                x, y = got
            yield x.to(self.device, non_blocking=cuda), y.to(self.device, non_blocking=cuda)

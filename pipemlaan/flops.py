"""FLOPs a rank's training work does per image, and the peak its device could do: FLOP
utilisation.

Counting rule (the usual one, as in torchtitan and the scaling-law papers): multiply-adds of
every convolution and linear layer in one forward pass at batch 1 (`layer_macs`; batch norm,
activations, pooling and losses are not counted: they are bandwidth, not FLOPs), 2 FLOPs per
multiply-add, and a training step = forward + backward at twice the forward (the gradients of
inputs and of weights), so **6 x MACs** per image for every layer that trains. A layer with no
trainable parameter (a LAM leap head's EMA twin: its input is detached and its weights follow
the live block by EMA) runs forward only: **2 x MACs**. A rank's figure sums its modules'
bodies and heads (independent heads g, window heads h with their leap copies and twins).

Achieved TFLOP/s = FLOPs per image x the images the rank trained per second; its share of the
device's peak uses dense (no 2:4 sparsity) peaks. `GPU_PEAKS` holds the datasheet figures of
the GPUs users train on, looked up by `torch.cuda.get_device_name`; `train.peak_tflops`
overrides it. On CPU the peak is measured: a short fp32 matmul timing with the rank's thread
count (`cpu_matmul_tflops`, once per process and thread count).

benchmarks/projection.py projects throughput from these counts.
"""

from __future__ import annotations

import time

import torch
from torch import nn

# Dense TFLOP/s per GPU: (name pattern, bf16, tf32, fp32). torchtitan's bf16 figures for A100
# and H100; the others from NVIDIA's datasheets (sparse figures halved). The first pattern whose
# words all occur in the device name wins, so the specific ones come first.
GPU_PEAKS = [
    ("h200 nvl", 835.0, 417.5, 60.0),
    ("h200", 989.0, 494.5, 67.0),
    ("h100 nvl", 835.0, 417.5, 60.0),
    ("h100 pcie", 756.0, 378.0, 51.0),
    ("h100", 989.0, 494.5, 67.0),          # SXM: "NVIDIA H100 80GB HBM3"
    ("a100", 312.0, 156.0, 19.5),
    ("l40s", 362.0, 183.0, 91.6),
]
PRECISIONS = ("bf16", "tf32", "fp32")


def layer_macs(layer: nn.Module, out) -> int:
    """Multiply-adds of one convolution, linear or attention layer that produced `out` (0
    otherwise). nn.MultiheadAttention (a ViT's, torchvision's EncoderBlock) runs its
    projections from its own weights, not through its `out_proj` module, so it is counted
    here as a whole: the q, k, v and output projections and the two attention products
    (Q K^T, weights x V), assuming self-attention (keys as many as queries); the softmax is
    not counted (bandwidth, as batch norm). `out` may be the layer's output tuple."""
    if isinstance(out, tuple):
        out = out[0]
    if isinstance(layer, nn.MultiheadAttention):
        e = layer.embed_dim
        tokens = out.numel() // e
        length = out.shape[1] if layer.batch_first else out.shape[0]
        return tokens * e * (2 * e + layer.kdim + layer.vdim + 2 * length)
    if isinstance(layer, nn.Conv2d):
        k = layer.kernel_size[0] * layer.kernel_size[1]
        return out.numel() * (layer.in_channels // layer.groups) * k
    if isinstance(layer, nn.ConvTranspose2d):
        k = layer.kernel_size[0] * layer.kernel_size[1]
        return out.numel() * (layer.in_channels // layer.groups) * k // \
            (layer.stride[0] * layer.stride[1])
    if isinstance(layer, nn.Linear):
        return out.numel() * layer.in_features
    return 0


def _trains(layer: nn.Module) -> bool:
    return any(p.requires_grad for p in layer.parameters(recurse=False))


def module_training_flops(module, x: torch.Tensor, images: torch.Tensor
                          ) -> tuple[int, torch.Tensor]:
    """(training FLOPs, body output) of one local module (pipemlaan/local/module.py: `body`,
    heads `g` and `h`) for the input batch `x`; `images` are the batch's images (InfoPro's
    decoder reconstructs them). Runs once in eval mode without gradients, so no running
    statistic moves; every submodule gets its mode back."""
    counted = {"trained": 0, "forward_only": 0}

    def hook(layer, _inp, out):
        if torch.is_tensor(out) or isinstance(out, tuple):
            counted["trained" if _trains(layer) else "forward_only"] += layer_macs(layer, out)

    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d,
                                                            nn.Linear, nn.MultiheadAttention))]
    handles = [m.register_forward_hook(hook) for m in layers]
    modes = [(m, m.training) for m in module.modules()]
    device = next(module.parameters()).device
    module.eval()
    try:
        with torch.no_grad():
            out = module.body(x.to(device))
            labels = torch.zeros(x.shape[0], dtype=torch.long, device=device)
            for head in (module.g, module.h):
                if head is not None:
                    head(out, labels, images.to(device))
    finally:
        for m, was in modes:
            m.training = was
        for h in handles:
            h.remove()
    flops = 6 * counted["trained"] + 2 * counted["forward_only"]
    return flops // x.shape[0], out


def training_flops_per_image(modules, in_shape, image_shape) -> list[int]:
    """Training FLOPs per image of each of `modules` (consecutive local modules whose first
    takes inputs of `in_shape`, without the batch), by the rule in the module docstring."""
    x = torch.zeros(1, *in_shape)
    images = torch.zeros(1, *image_shape)
    out = []
    for m in modules:
        flops, x = module_training_flops(m, x, images)
        out.append(flops)
        x = x.detach().float().cpu()
    return out


# ---- the device's peak ----------------------------------------------------------------------
def gpu_peak_tflops(name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of a GPU named `name` (torch.cuda.get_device_name) in `precision`
    (bf16, tf32, fp32); None for a GPU not in GPU_PEAKS."""
    low = name.lower()
    for pattern, *peaks in GPU_PEAKS:
        if all(word in low for word in pattern.split()):
            return peaks[PRECISIONS.index(precision)]
    return None


def precision_of(device: torch.device, bf16: bool) -> str:
    """The arithmetic a run's convolutions use: bf16 autocast on CUDA, else fp32 (on CUDA
    cuDNN runs fp32 convolutions on TF32 tensor cores unless torch.backends.cudnn.allow_tf32
    is off, torch's default being on)."""
    if device.type != "cuda":
        return "fp32"
    if bf16:
        return "bf16"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


_CPU_PEAK: dict[int, float] = {}      # threads -> measured TFLOP/s, once per process


def cpu_matmul_tflops(n: int = 512, rounds: int = 3, reps: int = 3) -> float:
    """Measured fp32 matmul TFLOP/s of this process at its current thread count: the best of
    `rounds` timings of `reps` n x n products (about 0.1 s on one core). Cached per process
    and thread count, so ranks that share a process (tests) measure once."""
    threads = torch.get_num_threads()
    if threads not in _CPU_PEAK:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        torch.mm(a, b)                       # first call: allocation, kernel selection
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            best = min(best, (time.perf_counter() - t0) / reps)
        _CPU_PEAK[threads] = 2 * n ** 3 / best / 1e12
    return _CPU_PEAK[threads]


def device_peak(device: torch.device, precision: str, override: float = 0.0
                ) -> tuple[float | None, str]:
    """(dense peak TFLOP/s, where it comes from) of one rank's device: `override` when > 0
    (train.peak_tflops), the datasheet table for known GPUs, a measured matmul on CPU; None
    for an unknown GPU."""
    if override > 0:
        return override, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_tflops(name, precision)
        return peak, (f"{name} datasheet, dense {precision}" if peak else f"{name}: unknown")
    return cpu_matmul_tflops(), f"measured fp32 matmul, {torch.get_num_threads()} thread(s)"


def utilisation(flops_per_image: float, images_per_s: float, peak_tflops: float | None
                ) -> tuple[float, float | None]:
    """(achieved TFLOP/s, share of the peak or None when the peak is unknown)."""
    tflops = flops_per_image * images_per_s / 1e12
    return tflops, (tflops / peak_tflops if peak_tflops else None)


def best_measured_peaks(ranks: list[dict]) -> list[dict]:
    """Every rank's facts (`peak_tflops`, `peak_source`, `host`) with the measured CPU peaks of
    ranks on one host and thread count replaced by their best: those ranks timed the same cores
    at the same moment, each slowed by the others' timing, so the fastest is the closest to
    what one of them can do alone."""
    best: dict[tuple, float] = {}
    for r in ranks:
        if r["peak_source"].startswith("measured") and r["peak_tflops"]:
            key = (r["host"], r["peak_source"])
            best[key] = max(best.get(key, 0.0), r["peak_tflops"])
    return [{**r, "peak_tflops": best.get((r["host"], r["peak_source"]), r["peak_tflops"])}
            for r in ranks]

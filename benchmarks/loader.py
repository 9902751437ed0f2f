"""Can the loader feed the first stage? ImageNet-like JPEGs read through pipemlaan's own
FolderSplit (the training path: seeded RandomResizedCrop + flip, or the evaluation resize and
centre crop), in images/s for each number of DataLoader workers and each decode path, against
the images/s the first stage of a pipeline consumes (its measured step time).

The benchmark writes its own JPEG folder in a temporary directory: sizes drawn like ImageNet's
typical photographs (400-500 x 350-375 pixels), quality 90, smooth content with grain so the
files weigh about what ImageNet's do. Each setting is timed over a second pass, after the first
one started the (persistent) workers; the first pass is reported as well.

The first stage's wait for data in a real run is the "data" bucket of its metrics lines
(records); this benchmark gives the ceiling the loader can reach on the machine.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.loader
     [--images 320 --classes 8 --batch 32 --workers 0,1,2 --decode cpu --model resnet34 --K 4
      --stages 4 --stage-batch 16]
Results: benchmarks/results/loader-<cpu|cuda>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.launch import machine
from pipemlaan.config import load_config
from pipemlaan.data import FolderSplit, dataset_spec
from pipemlaan.engine.costs import predicted_seconds
from pipemlaan.engine.partition import balanced_partition, stage_bounds, window_spans
from pipemlaan.engine.stage import Stage
from pipemlaan.local.module import build_local_modules, window_plan

RESULTS = Path(__file__).resolve().parent / "results"


def make_jpeg_folder(root: Path, images: int, classes: int, seed: int = 0) -> dict:
    """root/train/<class>/<i>.JPEG, ImageNet-like; returns the files' count and mean size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(images):
        c = i % classes
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(400, 501)), int(rng.integers(350, 376))
        coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 24, 24)).astype(np.float32))
        smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
        grain = torch.from_numpy(rng.normal(0, 18, (3, h, w)).astype(np.float32))
        pixels = (smooth + grain).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        path = folder / f"img_{i:05d}.JPEG"
        Image.fromarray(pixels).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return {"images": images, "classes": classes, "mean_kib": sum(sizes) / len(sizes) / 1024}


def loader_rate(folder: Path, workers: int, decode: str, batch: int, train: bool,
                device: torch.device) -> dict:
    spec = dataset_spec(load_config(None, ["--data.name=imagenet"]).data)
    split = FolderSplit(folder, spec, True, device, workers, decode=decode)
    rates = []
    for epoch in range(2):      # the first pass starts the workers; they persist after it
        t0, n = time.perf_counter(), 0
        for x, _ in split.batches(batch, epoch=epoch, seed=0, train=train):
            n += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    return {"workers": workers, "decode": decode, "path": "train" if train else "eval",
            "first_pass_img_s": rates[0], "img_s": rates[1]}


def first_stage_rate(model: str, K: int, stages: int, batch: int, steps: int,
                     device: torch.device) -> dict:
    """Images/s of stage 0 of a `stages`-stage pipeline (its train step and the backward of
    the window gradients it receives), all stages run in this process in turn."""
    cfg = load_config(None, ["--data.name=imagenet", f"--model.name={model}", f"--model.K={K}",
                             f"--train.batch_size={batch}"])
    spec = dataset_spec(cfg.data)
    torch.manual_seed(0)
    _, modules = build_local_modules(cfg, spec)
    plan = window_plan(cfg, len(modules))
    shape = (spec.in_channels, *spec.image_size)
    costs = predicted_seconds(modules, shape, batch, device.type)
    partition = balanced_partition(costs, stages, window_spans(plan))
    built = []
    for s in range(len(partition)):
        lo, hi = stage_bounds(partition, s)
        for m in modules[lo:hi]:
            m.to(device)
        built.append(Stage(cfg, modules[lo:hi], plan, device))
    x0 = torch.randn(batch, *shape, device=device)
    y0 = torch.randint(0, spec.num_classes, (batch,), device=device)
    times = []
    for step in range(steps):
        x, first = x0, 0.0
        for r, st in enumerate(built):
            t0 = time.perf_counter()
            x, upstream = st.train_step(step, 0.01, x, y0, None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r == 0:
                first += time.perf_counter() - t0
            if upstream:
                t0 = time.perf_counter()
                built[r - 1].receive_grads(step, upstream)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r == 1:
                    first += time.perf_counter() - t0
        times.append(first)
    steady = sorted(times[1:])[len(times[1:]) // 2] if steps > 1 else times[0]
    return {"model": model, "K": K, "stages": stages, "partition": partition, "batch": batch,
            "step_s": steady, "img_s": batch / steady}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--decode", default="cpu", help="cpu, gpu or cpu,gpu (gpu needs CUDA)")
    p.add_argument("--model", default="resnet34")
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--stage-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "gpu" in a.decode.split(",") and device.type != "cuda":
        p.error("--decode gpu decodes on the GPU, and this machine has none; use --decode cpu")
    load_before = os.getloadavg()[0]      # a shared machine: say how busy it was
    rows = []
    with tempfile.TemporaryDirectory(prefix="pipemlaan-loader-") as tmp:
        made = make_jpeg_folder(Path(tmp), a.images, a.classes)
        print(f"{made['images']} JPEGs, {made['classes']} classes, {made['mean_kib']:.0f} KiB "
              f"on average", flush=True)
        for decode in a.decode.split(","):
            for w in (int(v) for v in a.workers.split(",")):
                for train in (True, False):
                    row = loader_rate(Path(tmp) / "train", w, decode, a.batch, train, device)
                    rows.append(row)
                    print(row, flush=True)
    stage = first_stage_rate(a.model, a.K, a.stages, a.stage_batch, a.steps, device)
    print(stage, flush=True)
    kind = "cuda" if device.type == "cuda" else "cpu"
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    out = {"machine": machine(), "load_avg_1min": load, "device": kind, "data": made,
           "batch": a.batch,
           "loader": rows, "first_stage": stage,
           "command": "python -m benchmarks.loader " + " ".join(argv or [])}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"loader-{kind}-{stamp}.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Loader against the first stage ({kind}, {stamp})", "",
             f"{made['images']} generated ImageNet-like JPEGs (400-500 x 350-375, quality 90, "
             f"{made['mean_kib']:.0f} KiB on average, {made['classes']} classes), read by "
             f"FolderSplit at batch {a.batch} to 3x224x224; machine: {json.dumps(out['machine'])}; "
             f"1-minute load average {load[0]} before, {load[1]} after.",
             "", "| decode | workers | path | images/s (steady pass) | first pass (workers "
             "start) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['decode']} | {r['workers']} | {r['path']} | {r['img_s']:.1f} | "
                     f"{r['first_pass_img_s']:.1f} |")
    lines += ["", f"First stage: {stage['model']} K={stage['K']}, stage 0 of {stage['stages']} "
              f"(partition {stage['partition']}), batch {stage['batch']}: "
              f"{stage['step_s']:.3f} s per step, {stage['img_s']:.1f} images/s consumed.", ""]
    (a.out / f"loader-{kind}-{stamp}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

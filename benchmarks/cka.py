"""Representation similarity to end-to-end BP (the paper's CKA figure): linear CKA (Kornblith et
al. 2019) between each local module's output under DGL / DGL+MLAAN and the output of the same
block under BP, on the first N test images of the runs' data set.

  python -m benchmarks.study --epochs 1 --jobs 2 --workdir DIR    # makes the runs (kept in DIR)
  python -m benchmarks.cka --runs DIR [--seed 0] [--methods dgl,dgl+mlaan] [--images 2000]
  python -m benchmarks.cka --bp DIR/bp-s0-r1 --compare DIR/dgl-s0-r1 DIR/dgl+mlaan-s0-r1

Each run is rebuilt from its config.toml and its newest intact checkpoint and evaluated on the
CPU in eval mode. The BP network is one module, so its activation "at module k" is that of the
backbone block that ends module k of the compared run. Writes JSON + Markdown + PNG to
benchmarks/results/cka-fmnist-<stamp>.* (or --out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path

import torch

from pipemlaan.checkpoint_files import latest_checkpoint, load_module_file
from pipemlaan.config import load_config, method_label
from pipemlaan.data import dataset_spec, load_datasets
from pipemlaan.errors import PipemlaanError
from pipemlaan.local.module import build_local_modules

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MAKE = "python -m benchmarks.study --epochs 1 --jobs 2 --workdir {}"


class CkaError(Exception):
    """A one-line problem with the runs given, naming the fix."""


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) of the column-centred (n, p) and (n, q)."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).square().sum() / (torch.linalg.norm(x.T @ x) *
                                             torch.linalg.norm(y.T @ y)))


def gram(x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """The (n, n) float64 Gram matrix of the column-centred features. ||Y^T X||_F^2 =
    <X X^T, Y Y^T>, so CKA needs only these: n x n stays small where p (a conv layer's
    C*H*W) is not, and a run's activations can be dropped once its Grams are made."""
    k = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    for c in range(0, x.shape[1], chunk):   # float64 a slice at a time, not all of x at once
        xc = x[:, c:c + chunk].double()
        xc -= xc.mean(0)
        k += xc @ xc.T
    return k


def cka_from_grams(kx: torch.Tensor, ky: torch.Tensor) -> float:
    den = float(torch.linalg.norm(kx) * torch.linalg.norm(ky))
    return float((kx * ky).sum()) / den if den > 0 else math.nan   # constant features: no CKA


def load_run(run_dir: Path, make: str):
    """(config, local modules in eval mode, their blocks with the newest checkpoint's weights)."""
    if not (run_dir / "config.toml").is_file():
        raise CkaError(f"{run_dir} is not a finished run (no config.toml); make the runs with "
                       f"`{make}`")
    cfg = load_config(run_dir / "config.toml")
    found = latest_checkpoint(run_dir)
    if found is None:
        raise CkaError(f"{run_dir} holds no complete checkpoint; make the runs with `{make}`")
    d, meta = found
    _, modules = build_local_modules(cfg, dataset_spec(cfg.data))
    if meta["K"] != len(modules):
        raise CkaError(f"{d} has {meta['K']} modules but its config.toml gives {len(modules)}")
    for m in modules:
        # Only the backbone blocks matter here, and loading only them keeps runs whose heads
        # were built by an older head design (or other method.* head settings) readable.
        state = load_module_file(d / f"module_{m.index:03d}.pt", torch.device("cpu"))["module"]
        try:
            m.body.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("body.")})
        except RuntimeError as e:
            raise CkaError(f"{d / f'module_{m.index:03d}.pt'}: its blocks do not fit "
                           f"{cfg.model.name} as pipemlaan builds it now "
                           f"({str(e).splitlines()[-1].strip()})") from None
        m.eval()
    return cfg, modules


@torch.no_grad()
def block_grams(modules, images: torch.Tensor, wanted: set[int], batch: int
                ) -> dict[int, torch.Tensor]:
    """Gram matrix of the output of every backbone block in `wanted`, block by block, so a
    BP body (one module) and a cut network are read at the same block boundaries."""
    acts: dict[int, list[torch.Tensor]] = {b: [] for b in wanted}
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        for m in modules:
            for j, block in enumerate(m.body):
                x = block(x)
                if m.block_range[0] + j in wanted:
                    acts[m.block_range[0] + j].append(x.flatten(1))
    return {b: gram(torch.cat(a)) for b, a in acts.items()}


def compare(bp_dir: Path, others: list[Path], n_images: int, batch: int, make: str) -> dict:
    bp_cfg, bp_modules = load_run(bp_dir, make)
    _, test, _ = load_datasets(bp_cfg.data, "cpu")
    images = next(test.batches(n_images, epoch=0, seed=0, train=False))[0]  # the first N, in order
    loaded = [(p, *load_run(p, make)) for p in others]
    for p, cfg, _ in loaded:
        mine, ref = (cfg.model.name, cfg.model.width, cfg.data.name), \
            (bp_cfg.model.name, bp_cfg.model.width, bp_cfg.data.name)
        if mine != ref:
            raise CkaError(f"{p} is {mine} but {bp_dir} is {ref}; compare runs of the same "
                           f"model on the same data set")
    ends = {b for _, _, mods in loaded for b in (m.block_range[1] for m in mods)}
    ref_grams = block_grams(bp_modules, images, ends, batch)
    runs = {}
    for p, cfg, mods in loaded:
        grams = block_grams(mods, images, {m.block_range[1] for m in mods}, batch)
        label = method_label(cfg.method)
        runs[label if label not in runs else p.name] = {
            "run": str(p), "method": label, "seed": cfg.train.seed, "K": len(mods),
            "block_ends": [m.block_range[1] for m in mods],
            "cka": [cka_from_grams(ref_grams[m.block_range[1]], grams[m.block_range[1]])
                    for m in mods]}
    return {"bp": str(bp_dir), "bp_seed": bp_cfg.train.seed, "model": bp_cfg.model.name,
            "data": bp_cfg.data.name, "images": len(images), "runs": runs}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, r in result["runs"].items():
        ax.plot(range(1, r["K"] + 1), r["cka"], marker="o", label=label)
    ax.set_xlabel("local module")
    ax.set_ylabel("linear CKA with BP")
    ax.set_xticks(range(1, max(r["K"] for r in result["runs"].values()) + 1))
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Similarity to BP, {result['data']} ({result['images']} test images)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cka", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", help="folder holding the study's runs (bp-s0-r1, dgl-s0-r1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="dgl,dgl+mlaan")
    p.add_argument("--bp", help="the BP run folder (instead of --runs)")
    p.add_argument("--compare", nargs="+", default=[], help="run folders to compare with --bp")
    p.add_argument("--images", type=int, default=2000, help="the first N test images")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON, Markdown and PNG")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.runs and (args.bp or args.compare) or not (args.runs or args.bp and args.compare):
            raise CkaError("give either --runs DIR or both --bp PATH and --compare PATH...")
        if args.images < 1 or args.batch < 1:
            raise CkaError("--images and --batch must be at least 1")
        if args.runs:
            base = Path(args.runs)
            bp = base / f"bp-s{args.seed}-r1"
            others = [base / f"{m}-s{args.seed}-r1" for m in args.methods.split(",")]
        else:
            bp, others = Path(args.bp), [Path(c) for c in args.compare]
            base = bp.parent
        make = MAKE.format(base)
        for d in (bp, *others):
            if not d.is_dir():
                raise CkaError(f"run folder {d} not found; make the runs with `{make}`")
        result = compare(bp, others, args.images, args.batch, make)
    except (CkaError, PipemlaanError) as e:
        sys.stderr.write(f"benchmarks.cka: error: {e}\n")
        return 2
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    command = f"python -m benchmarks.cka {' '.join(sys.argv[1:] if argv is None else argv)}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cka-{'fmnist' if result['data'] == 'fashion_mnist' else result['data']}-{stamp}"
    # NaN is not JSON: a constant activation has no CKA, written as null
    clean = {k: {**r, "cka": [None if math.isnan(c) else c for c in r["cka"]]}
             for k, r in result["runs"].items()}
    stem.with_suffix(".json").write_text(json.dumps(
        {"date": stamp, "command": command, "args": vars(args), **result, "runs": clean},
        indent=1))
    labels = list(result["runs"])
    K = max(r["K"] for r in result["runs"].values())
    lines = [f"# Linear CKA with BP, {result['data']}, {stamp}", "", f"Command: `{command}`", "",
             f"{result['model']}, BP run {result['bp']}, the first {result['images']} test "
             f"images, each activation flattened per image, float64.", "",
             "| module | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for k in range(K):
        cells = [f"{r['cka'][k]:.4f}" if k < r["K"] else "–" for r in result["runs"].values()]
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(result, stem.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

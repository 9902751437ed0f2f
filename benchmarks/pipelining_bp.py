"""Baseline: end-to-end backprop of the same ResNet, pipelined over N ranks by PyTorch's own
torch.distributed.pipelining (PipelineStage + ScheduleGPipe / Schedule1F1B).

  OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=N benchmarks/pipelining_bp.py \
     --model resnet20 --schedule gpipe|1f1b --batch 128 --microbatches 4 \
     --image 1,28,28 --classes 10 --steps 40 --warmup 10 --seed 0 --out result.json

(`python benchmarks/pipelining_bp.py ...` without torchrun runs the 1-rank pipeline.)

Every rank builds the whole backbone under the same seed, keeps its contiguous run of
`blocks + [classifier]` and wraps it in a PipelineStage. Each step rank 0 feeds one batch of
random images, the last rank computes cross-entropy against random labels, the schedule runs
forward and backward over the microbatches (the gradient crosses every stage boundary), then
every rank takes its own SGD step. Steps after --warmup are timed; rank 0 writes --out (JSON)
and prints one summary line. gloo on CPU; NCCL on cuda:LOCAL_RANK when CUDA is available.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

# Run as a file by torchrun: the repository root must be importable for `pipemlaan`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe  # noqa: E402

from pipemlaan.engine.partition import balanced_partition, stage_bounds  # noqa: E402
from pipemlaan.errors import ConfigError  # noqa: E402
from pipemlaan.models import build_backbone, lookup  # noqa: E402

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def parse_args(argv: list[str] | None, world: int) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--schedule", default="gpipe", choices=sorted(SCHEDULES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--image", default="1,28,28", help="C,H,W")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=40, help="total steps, warm-up included")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps at the start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--data-batches", type=int, default=1,
                   help="distinct pre-generated batches cycled over (1: one fixed batch, so the "
                        "loss falls visibly)")
    p.add_argument("--partition", default="balanced",
                   help="'balanced' (timed on rank 0), 'equal' (equal item counts) or counts "
                        "per rank such as 4,6 over blocks+[classifier]")
    p.add_argument("--out", default=None, help="JSON result written by rank 0")
    a = p.parse_args(argv)

    try:
        lookup(a.model)
    except ConfigError as e:
        raise UsageError(f"--model: {e}") from None
    try:
        image = tuple(int(v) for v in a.image.split(","))
    except ValueError:
        image = ()
    if len(image) != 3 or min(image) < 1:
        raise UsageError(f"--image must be C,H,W with positive integers, got {a.image!r}")
    a.image = image
    for name in ("batch", "microbatches", "steps", "data_batches"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if a.classes < 2:
        raise UsageError("--classes must be >= 2")
    if not 0 <= a.warmup < a.steps:
        raise UsageError(f"--warmup must be in [0, --steps) so some steps are timed "
                         f"(got warmup {a.warmup}, steps {a.steps})")
    # Every microbatch must have the same shape: the receive buffers are sized once from the first.
    if a.batch % a.microbatches:
        raise UsageError(f"--batch {a.batch} is not divisible by --microbatches {a.microbatches}")
    if a.schedule == "1f1b" and a.microbatches < world:
        raise UsageError(f"1f1b needs --microbatches >= ranks ({world}), got {a.microbatches}")
    return a


# ---- process group ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:     # plain `python`: a 1-rank group of our own
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ---- the split ----------------------------------------------------------------------------
def measure_costs(items: list[nn.Module], x: torch.Tensor, rounds: int = 7) -> list[float]:
    """Seconds of forward + backward per item on one microbatch: the fastest of `rounds`, after
    a warm-up round. Rounds visit every item in turn, so a burst of other load on the machine
    slows one round of all items rather than every timing of one item (which would move the
    split); the minimum is what depends least on such load. State (BN statistics) and
    gradients are restored, so profiling changes nothing."""
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in items]
    inputs = []
    with torch.no_grad():
        for m in items:
            inputs.append(x)
            x = m(x)

    def sync():
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    best = [float("inf")] * len(items)
    for r in range(rounds + 1):
        for i, (m, inp) in enumerate(zip(items, inputs)):
            sync()
            t0 = time.perf_counter()
            # As in the pipeline: only activations from a previous stage need an input gradient.
            m(inp.requires_grad_(i > 0)).float().square().mean().backward()
            sync()
            if r:
                best[i] = min(best[i], time.perf_counter() - t0)
    for m, state in zip(items, saved):
        m.zero_grad(set_to_none=True)
        m.load_state_dict(state)
    return best


def choose_split(args, items: list[nn.Module], world: int, rank: int,
                 device: torch.device) -> tuple[list[int], list[float] | None]:
    """Item counts per rank, identical on every rank."""
    n = len(items)
    if world > n:
        raise UsageError(f"{world} ranks but {args.model} has only {n} items "
                         f"(blocks + classifier); use at most {n} ranks")
    if args.partition == "equal":
        base, extra = divmod(n, world)
        return [base + (r < extra) for r in range(world)], None
    if args.partition != "balanced":
        try:
            counts = [int(v) for v in args.partition.split(",")]
        except ValueError:
            counts = []
        if len(counts) != world or min(counts) < 1 or sum(counts) != n:
            raise UsageError(f"--partition {args.partition!r}: need {world} positive counts "
                             f"summing to {n} (blocks + classifier), 'equal' or 'balanced'")
        return counts, None
    if world == 1:
        return [n], None
    # Timing differs between ranks, so only rank 0 measures and every rank uses its numbers.
    box: list = [None]
    if rank == 0:
        g = torch.Generator().manual_seed(args.seed + 1)
        x = torch.randn(args.batch // args.microbatches, *args.image, generator=g).to(device)
        for m in items:
            m.to(device)
        box[0] = measure_costs(items, x)
        for m in items:
            m.to("cpu")
    dist.broadcast_object_list(box, src=0, device=device)
    costs = box[0]
    return balanced_partition(costs, world), costs


def describe_split(counts: list[int], costs: list[float] | None, n_items: int) -> str:
    parts, start = [], 0
    for r, c in enumerate(counts):
        names = [("stem" if i == 0 else "classifier" if i == n_items - 1 else f"block{i}")
                 for i in (start, start + c - 1)]
        span = names[0] if c == 1 else f"{names[0]}..{names[1]}"
        ms = f" ~{sum(costs[start:start + c]) * 1e3:.1f} ms/microbatch" if costs else ""
        parts.append(f"rank {r}: {span} ({c} items{ms})")
        start += c
    return f"split {counts}: " + "; ".join(parts)


class Contiguous(nn.Module):
    """The stage's output in contiguous memory: torch.pipelining's receiver allocates its buffer
    with the strides the sender's output had, and gloo/NCCL receive only into contiguous tensors
    (a ViT encoder layer returns its attention output's transposed strides). A no-op otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


# ---- the run ------------------------------------------------------------------------------
def run(args, rank: int, world: int, device: torch.device) -> dict | None:
    torch.manual_seed(args.seed)
    c, h, w = args.image
    backbone = build_backbone(args.model, c, args.classes, image_size=(h, w))
    items = [*backbone.blocks, backbone.classifier]
    counts, costs = choose_split(args, items, world, rank, device)
    if rank == 0:
        print(describe_split(counts, costs, len(items)), flush=True)
    lo, hi = stage_bounds(counts, rank)
    submod = nn.Sequential(*items[lo:hi], Contiguous()).to(device)
    del backbone, items

    # Shapes are inferred on the first step (dynamic metadata inference), which is a warm-up step.
    stage = PipelineStage(submod, rank, world, device)
    schedule = SCHEDULES[args.schedule](stage, n_microbatches=args.microbatches,
                                        loss_fn=nn.functional.cross_entropy)
    opt = torch.optim.SGD(submod.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)

    # Same generator on every rank so images (used on rank 0) and labels (used on the last
    # rank) pair up identically; generated before timing so data costs nothing per step.
    g = torch.Generator().manual_seed(args.seed)
    data = [(torch.randn(args.batch, c, h, w, generator=g),
             torch.randint(0, args.classes, (args.batch,), generator=g))
            for _ in range(args.data_batches)]
    first, last = stage.is_first, stage.is_last
    data = [(x.to(device) if first else None, y.to(device) if last else None) for x, y in data]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step_losses: list[torch.Tensor] = []
    times: list[float] = []
    t_start = None
    for step in range(args.steps):
        if step == args.warmup:
            sync()
            dist.barrier()
            t_start = time.perf_counter()
        x, y = data[step % len(data)]
        t0 = time.perf_counter()
        mb_losses: list[torch.Tensor] = []
        inputs = (x,) if first else ()
        if last:
            schedule.step(*inputs, target=y, losses=mb_losses, return_outputs=False)
        else:
            schedule.step(*inputs, return_outputs=False)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        if last:
            # Mean of the per-microbatch mean losses = the batch's mean loss (equal microbatches).
            step_losses.append(torch.stack(mb_losses).detach().mean())
    total = time.perf_counter() - t_start

    # Per-rank clocks differ by the pipeline skew, so the slowest rank defines each figure.
    t = torch.tensor([total, *times], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    total, times = t[0].item(), t[1:].tolist()
    losses = (torch.stack(step_losses).float() if last
              else torch.zeros(args.steps, device=device))
    dist.broadcast(losses, src=world - 1)
    if rank != 0:
        return None
    losses = losses.tolist()
    timed = args.steps - args.warmup
    return {
        "framework": "torch.distributed.pipelining", "schedule": args.schedule, "ranks": world,
        "model": args.model, "batch": args.batch, "microbatches": args.microbatches,
        "images_per_s": args.batch * timed / total,
        "step_s_median": statistics.median(times), "step_s_min": min(times),
        "step_s_max": max(times), "split": counts, "losses": [losses[0], losses[-1]],
        "torch": torch.__version__,
        # Extra context for whoever reads the result later.
        "image": list(args.image), "classes": args.classes, "steps": args.steps,
        "warmup": args.warmup, "timed_steps": timed, "timed_s": total, "seed": args.seed,
        "data_batches": args.data_batches, "partition": args.partition,
        "split_costs_s": costs, "loss_curve": losses, "device": str(device),
        "backend": dist.get_backend(), "threads_per_rank": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    quiet = int(os.environ.get("RANK", "0")) != 0    # one error line, not one per rank
    try:
        args = parse_args(argv, world_env)   # before the process group: a bad flag never hangs
    except UsageError as e:
        if not quiet:
            print(f"pipelining_bp.py: error: {e}", file=sys.stderr)
        return 2
    rank, world, device = init_distributed()
    try:
        result = run(args, rank, world, device)
    except UsageError as e:
        if rank == 0:
            print(f"pipelining_bp.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    if result is not None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        r = result
        print(f"pipelining_bp {r['model']} {r['schedule']} ranks={r['ranks']} "
              f"batch={r['batch']} microbatches={r['microbatches']}: "
              f"{r['images_per_s']:.1f} images/s, step median {r['step_s_median'] * 1e3:.1f} ms "
              f"(min {r['step_s_min'] * 1e3:.1f}, max {r['step_s_max'] * 1e3:.1f}), "
              f"loss {r['losses'][0]:.3f} -> {r['losses'][1]:.3f}, split {r['split']}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a rank's records hold: a training window's metrics.jsonl line, and its part of
summary.json, which rank 0 puts together (DESIGN.md's contract) once every rank's part arrived
through the schedule's "gather summary" collective.
"""

from __future__ import annotations

from pipemlaan.config import method_label
from pipemlaan.metrics import cuda_memory, state_bytes


def memory(setup) -> dict:
    """This rank's peak memory: the CPU figure (saved tensors + state), or CUDA's allocator."""
    stage = setup.stage
    static = state_bytes(list(stage.modules.values()), stage.optimizers.values())
    out = {"peak_memory_bytes": setup.tracker.peak + static}
    out.update(cuda_memory(setup.env.device))
    if "cuda_max_allocated" in out:
        out["peak_memory_bytes"] = out["cuda_max_allocated"]
    return out


def train_record(setup, clock, step: int, epoch: int, lr: float, images_per_s: float,
                 elapsed: float) -> dict:
    """One metrics.jsonl line for a logging window of `elapsed` seconds on this rank; `clock`
    (engine/p2p.py StepClock) holds the window's compute and wait seconds."""
    recv, send, compute = (clock.seconds(k) for k in ("recv", "send", "compute"))
    return {
        "kind": "train", "step": step, "epoch": epoch, "rank": setup.env.rank,
        "replica": setup.replica, "stage": setup.stage_index, "modules": setup.stage.indices,
        "lr": lr, "losses": {str(k): float(v) for k, v in setup.stage.losses.items()},
        "images_per_s": images_per_s, "compute_frac": compute / elapsed,
        "recv_wait_s": recv, "send_wait_s": send,
        "recv_wait_frac": recv / elapsed, "send_wait_frac": send / elapsed,
        "activation_bytes": setup.tracker.peak, **memory(setup),
    }


def summary_part(setup, train_time: float) -> dict:
    """This rank's part of summary.json."""
    stage = setup.stage
    K = len(setup.all_modules)
    backbone_sum = 0.0
    for m in stage.modules.values():
        for p in m.body.parameters():
            backbone_sum += p.detach().double().sum().item()
        if m.index == K - 1:
            for p in m.h.parameters():
                backbone_sum += p.detach().double().sum().item()
    return {"losses": {k: float(v) for k, v in stage.losses.items()},
            "param_sum": backbone_sum, "train_time": train_time, "skipped": stage.skipped,
            "activation_bytes": setup.tracker.peak, **memory(setup)}


def summary(setup, parts: list[dict], result: dict, images: int, wall: float, step: int,
            epoch: int) -> dict:
    """summary.json's content from every rank's `summary_part` (rank 0)."""
    cfg, placement = setup.cfg, setup.placement
    K = len(setup.all_modules)
    losses: dict[int, float] = {}   # each replica's loss is over its slice: the batch's is the mean
    for p in parts:
        for k, v in p["losses"].items():
            losses[k] = losses.get(k, 0.0) + v / placement.replicas
    slowest = max(p["train_time"] for p in parts)
    skipped: dict[int, int] = {}    # replicas skip together: the same count on each
    for p in parts:
        for k, n in p["skipped"].items():
            skipped[k] = max(skipped.get(k, 0), n)
    return {
        "method": method_label(cfg.method), "model": cfg.model.name,
        "dataset": cfg.data.name, "K": K, "world_size": setup.env.world,
        "replicas": placement.replicas, "stages": placement.stages,
        "partition": list(placement.partition),
        "mode": cfg.pipeline.mode, "epochs": epoch, "steps": step, **result,
        "images_per_s": images / slowest if slowest > 0 else 0.0, "wall_s": wall,
        "peak_memory_bytes": [p["peak_memory_bytes"] for p in parts],
        "activation_bytes": [p["activation_bytes"] for p in parts],
        "final_train_loss_per_module": [losses.get(k) for k in range(K)],
        # train.nonfinite=skip: updates dropped per module because a loss or gradient was
        # not finite
        "skipped_updates": {str(k): n for k, n in sorted(skipped.items())},
        "param_checksum": sum(p["param_sum"] for p in parts[:placement.stages]),
        # replicas of a stage must agree: a difference means they drifted apart
        "param_checksum_per_rank": [p["param_sum"] for p in parts],
        "device": str(setup.env.device),
    }

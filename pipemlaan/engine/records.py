"""What a rank's records hold: a training window's metrics.jsonl line, and its part of
summary.json, which rank 0 puts together (DESIGN.md's contract) once every rank's part arrived
through the schedule's "gather summary" collective.
"""

from __future__ import annotations

from pipemlaan.config import method_label
from pipemlaan.data import dataset_spec
from pipemlaan.engine.p2p import PARTS
from pipemlaan.flops import device_peak, precision_of, training_flops_per_image, utilisation
from pipemlaan.metrics import cuda_memory, host_total_bytes, state_bytes
from pipemlaan.provenance import this_rank


def memory(setup) -> dict:
    """This rank's peak memory since start-up ended: the CPU figure (saved tensors + state), or
    CUDA's allocator; its parts (saved for backward, state, P2P buffers) on either device, and
    the share of the device's memory (the host's on CPU)."""
    stage = setup.stage
    static = state_bytes(list(stage.modules.values()), stage.optimizers.values())
    p2p = setup.transport.buffer_bytes() if setup.transport is not None else 0
    out = {"peak_memory_bytes": setup.tracker.peak + static, "state_bytes": static,
           "p2p_buffer_bytes": p2p}
    out.update(cuda_memory(setup.env.device))
    if "cuda_max_allocated" in out:
        out["peak_memory_bytes"] = out["cuda_max_allocated"]
    total = out.pop("device_total_bytes", None) or host_total_bytes()
    out["memory_share"] = out["peak_memory_bytes"] / total if total else None
    return out


# a window's parts (engine/p2p.py StepClock) as a record names them: <name>_s and <name>_frac
PART_NAMES = {"compute": "compute", "recv": "recv_wait", "send": "send_wait",
              "data": "data_wait", "lam": "lam", "allreduce": "allreduce", "other": "other"}
assert set(PART_NAMES) == {*PARTS, "other"}


def rank_facts(setup) -> dict:
    """What this rank is for the whole run: its host and device (pipemlaan/provenance.py), its
    modules and their parameters, the training FLOPs per image of its work and its device's
    peak (pipemlaan/flops.py). Gathered from every rank at start-up, for the banner,
    provenance.json and the records."""
    cfg, env, stage = setup.cfg, setup.env, setup.stage
    spec = dataset_spec(cfg.data)
    image_shape = (spec.in_channels, *spec.image_size)
    in_shape = setup.transport.in_shape if setup.transport is not None else image_shape
    modules = [stage.modules[k] for k in stage.indices]
    precision = precision_of(env.device, cfg.train.bf16)
    peak, source = device_peak(env.device, precision, cfg.train.peak_tflops)
    return {**this_rank(env.rank, env.device), "replica": setup.replica,
            "stage": setup.stage_index, "modules": [stage.indices[0], stage.indices[-1]],
            "params": sum(p.numel() for m in modules for p in m.parameters()),
            "flops_per_image": sum(training_flops_per_image(modules, in_shape, image_shape)),
            "precision": precision, "peak_tflops": peak, "peak_source": source}


def train_record(setup, clock, step: int, epoch: int, lr: float, images_per_s: float,
                 elapsed: float, facts: dict) -> dict:
    """One metrics.jsonl line for a logging window of `elapsed` seconds on this rank; `clock`
    (engine/p2p.py StepClock) holds the window's seconds per part, `facts` this rank's
    `rank_facts`. `images_per_s` counts whole batches: a replica trains 1/D of each."""
    parts = clock.parts(elapsed)
    timing = {"window_s": elapsed}
    for part, name in PART_NAMES.items():
        timing[f"{name}_s"] = parts[part]
        timing[f"{name}_frac"] = parts[part] / elapsed
    tflops, share = utilisation(facts["flops_per_image"],
                                images_per_s / setup.placement.replicas, facts["peak_tflops"])
    return {
        "kind": "train", "step": step, "epoch": epoch, "rank": setup.env.rank,
        "replica": setup.replica, "stage": setup.stage_index, "modules": setup.stage.indices,
        "lr": lr, "losses": {str(k): float(v) for k, v in setup.stage.losses.items()},
        "images_per_s": images_per_s, **timing,
        "flops_per_image": facts["flops_per_image"], "tflops": tflops,
        "peak_tflops": facts["peak_tflops"], "peak_share": share,
        "activation_bytes": setup.tracker.peak, **memory(setup),
    }


def summary_part(setup, train_time: float, facts: dict, images: int,
                 compute_per_step: float | None = None) -> dict:
    """This rank's part of summary.json; `images`: the batches' images this launch trained in
    `train_time` seconds (a replica trained 1/D of them); `compute_per_step`: the measured
    compute seconds of a training step on this rank (None before any logged window)."""
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
            "flops_per_image": facts["flops_per_image"], "peak_tflops": facts["peak_tflops"],
            "tflops": utilisation(facts["flops_per_image"],
                                  images / setup.placement.replicas / train_time if train_time
                                  else 0.0, facts["peak_tflops"])[0],
            "predicted_stage_s": setup.predicted_stage_s,
            "measured_stage_s": compute_per_step,
            "startup_memory": setup.startup_memory,
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
        # what the partition balanced (engine/costs.py) beside what each rank computed
        "predicted_stage_s": [p["predicted_stage_s"] for p in parts],
        "measured_stage_s": [p["measured_stage_s"] for p in parts],
        "memory_share": [p["memory_share"] for p in parts],
        **({"startup_memory": [p["startup_memory"] for p in parts]}
           if any(p["startup_memory"] for p in parts) else {}),
        # FLOP utilisation per rank over the run's training time (pipemlaan/flops.py)
        "flops_per_image": [p["flops_per_image"] for p in parts],
        "tflops": [p["tflops"] for p in parts],
        "peak_tflops": [p["peak_tflops"] for p in parts],
        "peak_share": [p["tflops"] / p["peak_tflops"] if p["peak_tflops"] else None
                       for p in parts],
        "final_train_loss_per_module": [losses.get(k) for k in range(K)],
        # train.nonfinite=skip: updates dropped per module because a loss or gradient was
        # not finite
        "skipped_updates": {str(k): n for k, n in sorted(skipped.items())},
        "param_checksum": sum(p["param_sum"] for p in parts[:placement.stages]),
        # replicas of a stage must agree: a difference means they drifted apart
        "param_checksum_per_rank": [p["param_sum"] for p in parts],
        "device": str(setup.env.device),
    }


def banner_lines(setup, ranks: list[dict], compiled: str, graphed: str) -> list[str]:
    """What rank 0 prints at start-up, in both views: the run folder, the world, the partition
    with each stage's parameters, FLOPs per image and device peak (`ranks`: every rank's
    `rank_facts`), the steps, the precision, and what is compiled or graphed; plus one warning
    line when a GPU's peak is unknown."""
    cfg, env, pl = setup.cfg, setup.env, setup.placement
    cuda = env.device.type == "cuda"
    lines = [f"pipemlaan: run {cfg.run_dir} | world {env.world} = {pl.replicas} replica(s) x "
             f"{pl.stages} stage(s) | {env.backend or 'one process'} on {env.device.type}"]
    for st in range(pl.stages):
        mine = [r for r in ranks if r["stage"] == st]
        f = mine[0]
        peak = "?" if f["peak_tflops"] is None else f"{f['peak_tflops']:.3g}"
        lines.append(f"  stage {st} (rank {', '.join(str(r['rank']) for r in mine)}): modules "
                     f"{f['modules'][0]}-{f['modules'][1]}, {f['params']:,} parameters, "
                     f"{f['flops_per_image'] / 1e6:,.1f} MFLOP per image trained; peak {peak} "
                     f"TFLOP/s ({f['peak_source']})")
    lines.append(f"  steps {setup.total_steps} ({setup.steps_per_epoch} per epoch"
                 + (f", from step {setup.schedule.start}" if setup.schedule.start else "")
                 + f") | precision {ranks[0]['precision']}, "
                 f"{'channels-last' if cuda and cfg.train.channels_last else 'NCHW'} | "
                 f"compiled: {compiled} | CUDA graph: {graphed}")
    unknown = [r for r in ranks if r["peak_tflops"] is None]
    if unknown:
        lines.append(f"pipemlaan: warning: no peak FLOP/s known for {unknown[0]['device_name']} "
                     f"(rank {', '.join(str(r['rank']) for r in unknown)}): the share of peak "
                     f"shows '?'; set --train.peak_tflops to one device's dense TFLOP/s")
    return lines

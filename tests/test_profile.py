"""Memory profiler and throughput cost model.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_profile.py -q
"""

import pytest
import torch

from benchmarks.cost_model import Setup, predict
from pipemlaan.config import Config
from pipemlaan.data import DatasetSpec
from pipemlaan.profile import _numel_out, profile_memory

SPEC = DatasetSpec("synthetic", 1, (16, 16), 10, (0.0,), (1.0,))


def _cfg(method: str, mlm: bool, lam: bool, K: int, heads: str = "compact") -> Config:
    """(the compact heads unless asked: the reference DGL* head's own graph would dominate
    the memory these tests compare)"""
    cfg = Config()
    cfg.model.name, cfg.model.K = "resnet20", K
    cfg.method.name, cfg.method.mlm, cfg.method.lam = method, mlm, lam
    cfg.method.heads = heads
    return cfg


@pytest.fixture(scope="module")
def peaks():
    torch.set_num_threads(1)
    bp = profile_memory(_cfg("bp", False, False, 10), SPEC, 1, 32, steps=1)[0]
    local = profile_memory(_cfg("dgl", True, True, 10), SPEC, 1, 32, steps=1)[0]
    split = profile_memory(_cfg("dgl", True, True, 10), SPEC, 2, 32, steps=1,
                           partition=[5, 5])
    return bp, local, split


def test_local_learning_saves_activation_memory_over_bp(peaks):
    bp, local, _ = peaks
    # BP keeps the whole graph; a local method keeps at most a window's worth of modules
    # (and one head's graph at a time: the reference DGL* head is a heavy one, see below)
    assert local["activation_bytes"] < 0.8 * bp["activation_bytes"]
    lean = profile_memory(_cfg("linear", True, True, 10), SPEC, 1, 32, steps=1)[0]
    assert lean["activation_bytes"] < 0.8 * bp["activation_bytes"]


def test_reference_dgl_star_head_outweighs_the_compact_one():
    """auxDGL runs three 128-channel 1x1 convolutions at the module's full resolution: on
    16-channel modules its graph is several times the module's (README, Memory per device)."""
    ref = profile_memory(_cfg("dgl", True, True, 10, heads="reference"), SPEC, 1, 32,
                         steps=1)[0]
    compact = profile_memory(_cfg("dgl", True, True, 10), SPEC, 1, 32, steps=1)[0]
    assert ref["activation_bytes"] > 1.5 * compact["activation_bytes"]
    assert ref["state_bytes"] > 2 * compact["state_bytes"]


def test_pipeline_ranks_hold_less_than_the_single_process(peaks):
    _, local, split = peaks
    assert [r["modules"] for r in split] == [list(range(5)), list(range(5, 10))]
    for r in split:
        assert 0 < r["activation_bytes"] <= local["activation_bytes"]
        assert 0 < r["state_bytes"] < local["state_bytes"]
    # P2P buffers: rank 0 receives window gradients shaped like its own output (one window
    # crosses with W=2); rank 1 a ring of 2 activations shaped like its input, and nothing back
    out0 = 32 * _numel_out(profile_modules(), 4, SPEC) * 4
    assert split[0]["comm_bytes"] == out0
    assert split[1]["comm_bytes"] == 2 * out0


def profile_modules():
    from pipemlaan.local.module import build_local_modules
    return build_local_modules(_cfg("dgl", True, True, 10), SPEC)[1]


def test_stage_alone_measures_each_rank_with_real_shapes():
    """profile.stage_alone (what the GPU check runs on CUDA) on CPU: each rank's step time and
    memory, the pipeline's ranks each below the single process."""
    from pipemlaan.local.module import window_plan
    from pipemlaan.profile import stage_alone
    cfg = _cfg("dgl", True, True, 10)
    mods = profile_modules()
    plan = window_plan(cfg, len(mods))
    cpu = torch.device("cpu")
    one = stage_alone(cfg, SPEC, mods, plan, [10], 0, 32, cpu, steps=2, warmup=1)
    per = [stage_alone(cfg, SPEC, mods, plan, [5, 5], r, 32, cpu, steps=2, warmup=1)
           for r in (0, 1)]
    assert [p["modules"] for p in per] == [[0, 4], [5, 9]]
    for p in per:
        assert 0 < p["peak_bytes"] < one["peak_bytes"]
        assert 0 < p["step_s"] < one["step_s"]


def test_cost_model_is_set_by_the_slowest_stage():
    s = Setup(costs=[1.0, 1.0, 2.0, 1.0], boundary_bytes=[0, 0, 0, 0], grad_bytes=[4] * 4,
              batch=10)
    assert predict(s, [4], float("inf"))["images_per_s"] == pytest.approx(10 / 5)
    two = predict(s, [2, 2], float("inf"))
    assert two["images_per_s"] == pytest.approx(10 / 3)
    assert two["balance"] == pytest.approx(2.5 / 3)
    # replicas multiply throughput and pay an all-reduce of the stage's gradients
    rep = predict(s, [2, 2], float("inf"), replicas=4, dp_bandwidth=1.0)
    assert rep["images_per_s"] == pytest.approx(4 * 10 / (3 + 2 * 3 / 4 * 8))


def test_cost_model_charges_unoverlapped_transfers():
    s = Setup(costs=[1.0, 1.0], boundary_bytes=[100, 100], grad_bytes=[0, 0], batch=1)
    hidden = predict(s, [1, 1], bandwidth=100.0, overlap=1.0)["images_per_s"]
    exposed = predict(s, [1, 1], bandwidth=100.0, overlap=0.0)["images_per_s"]
    # each rank moves one activation and one window gradient: 200 bytes at 100 B/s
    assert hidden == pytest.approx(1.0)
    assert exposed == pytest.approx(1 / 3)


def test_gpu_projection_runs_on_cpu_and_projects_from_measured_stage_times(tmp_path):
    """benchmarks/gpu_projection.py (the GPU check's projection) with the CPU's clock: every
    figure present, the pipeline set by its slowest measured stage, BP's 1F1B with its
    bubble, and the stages x replicas layout on 8 devices."""
    import json

    from benchmarks.gpu_projection import main
    out = tmp_path / "proj.json"
    assert main(["--device", "cpu", "--model", "resnet8", "--K", "4", "--batch", "32",
                 "--image", "3,16,16", "--stages", "2", "--steps", "2", "--warmup", "1",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    two = next(r for r in res["projected"] if r["gpus"] == 2)
    assert two["pipemlaan_images_per_s"] == pytest.approx(32 / max(two["stage_step_s"]))
    bubble = (8 + 2 - 1) * max(two["bp_1f1b_stage_fwd_bwd_s"])
    assert two["bp_1f1b_images_per_s"] == pytest.approx(32 / bubble)
    eight = next(r for r in res["projected"] if r["gpus"] == 8)
    assert (eight["stages"], eight["replicas"]) == (2, 4)
    assert set(res["measured"]["single_process_images_per_s"]) == {"bp", "dgl+mlaan"}


def test_table3_per_rank_stage_alone_path_with_the_papers_figures():
    """The Table 3 path the GPU check takes on CUDA (each rank's stage alone), run on CPU with
    a small network: one process and every rank measured, the paper's figure beside MLAAN."""
    from pipemlaan.profile import METHODS, table3
    nets = [("ResNet-32 (K=16)", "resnet8", 4, "cifar")]
    rows = table3(2, 8, 8, methods=[m for m in METHODS if m[0] in ("bp", "dgl+mlaan")],
                  nets=nets, alone=True, steps=1)
    bp, mlaan = rows
    assert bp["paper_gb"] == 3.37 and mlaan["paper_gb"] == 2.62
    assert bp["per_rank_bytes"] is None and len(mlaan["per_rank_bytes"]) == 2
    assert all(0 < b < mlaan["single_process_bytes"] for b in mlaan["per_rank_bytes"])
    assert len(mlaan["per_rank_step_s"]) == 2 and mlaan["single_step_s"] > 0


def test_gpu_busy_counts_overlapping_kernels_once_over_the_traced_wall_time():
    """benchmarks/gpu_busy.py (the GPU check's "is the step GPU-bound?" figure) on a trace in
    torch.profiler's format: kernels 0-40 and 30-50 us (two streams) and 80-90 us, CPU ops
    spanning 0-100 us: busy 60 of 100 us."""
    from benchmarks.gpu_busy import busy_fraction
    trace = {"traceEvents": [
        {"cat": "cpu_op", "name": "module 0 forward", "ts": 0, "dur": 100},
        {"cat": "kernel", "name": "conv", "ts": 0, "dur": 40},
        {"cat": "kernel", "name": "bn", "ts": 30, "dur": 20},
        {"cat": "kernel", "name": "sgd", "ts": 80, "dur": 10},
        {"ph": "M", "name": "process_name"}]}
    res = busy_fraction(trace)
    assert res["kernels"] == 3 and res["busy_us"] == 60 and res["busy_fraction"] == 0.6

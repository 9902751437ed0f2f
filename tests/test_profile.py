"""Memory profiler (the cost model's tests are in tests/test_projection.py).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_profile.py -q
"""

import pytest
import torch

from pipemlaan.config import Config, load_config, method_flags
from pipemlaan.data import DatasetSpec
from pipemlaan.profile import _numel_out, profile_memory

SPEC = DatasetSpec("synthetic", 1, (16, 16), 10, (0.0,), (1.0,))


def _cfg(method: str, mlm: bool, lam: bool, K: int, heads: str = "compact") -> Config:
    """(the compact heads unless asked: these tests compare the pipeline's own memory, which
    the heads' parameters would dwarf on these tiny modules)"""
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
    # (and one head's graph at a time)
    assert local["activation_bytes"] < 0.8 * bp["activation_bytes"]
    lean = profile_memory(_cfg("linear", True, True, 10), SPEC, 1, 32, steps=1)[0]
    assert lean["activation_bytes"] < 0.8 * bp["activation_bytes"]


def test_dgl_star_work_and_activations_stay_within_the_method_s_promise():
    """The authors' DGL* head pools to 8x8 before its convolutions: DGL+MLAAN on ResNet-32 K=16
    then does under 6.5x BP's multiply-adds per image (8.2x with the head at full resolution)
    and saves fewer activations than BP for backward; the plain DGL baseline stays near BP."""
    from benchmarks.projection import flop_setup

    def macs(method: str) -> float:
        return sum(flop_setup("resnet32", 16, method, 1, (3, 32, 32), 1.0).costs)
    bp = macs("bp")
    assert macs("dgl+mlaan") < 6.5 * bp
    assert macs("dgl") < 1.5 * bp
    cifar = DatasetSpec("cifar10", 3, (32, 32), 10, (0.0,) * 3, (1.0,) * 3)

    def peak(method: str) -> dict:
        cfg = load_config(None, ["--data.name=cifar10", "--model.name=resnet32", "--model.K=16",
                                 *method_flags(method)])
        return profile_memory(cfg, cifar, 1, 16, steps=1)[0]
    assert peak("dgl+mlaan")["activation_bytes"] < peak("bp")["activation_bytes"]


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
    memory, the pipeline's ranks each below the single process in memory (their step times
    are measured, not compared: two steps on shared cores order nothing)."""
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
        assert 0 < p["step_s"] < float("inf")


def test_table3_per_rank_stage_alone_path_with_the_papers_figures():
    """The Table 3 path the GPU check takes on CUDA (each rank's stage alone), run on CPU with
    a small network: one process and every rank measured, the paper's figure beside MLAAN."""
    from benchmarks.table3 import METHODS, table3
    nets = [("ResNet-32 (K=16)", "resnet8", 4, "cifar")]
    seen = []
    rows = table3(2, 8, 8, methods=[m for m in METHODS if m[0] in ("bp", "dgl+mlaan")],
                  nets=nets, alone=True, steps=1, warmup=1, precisions=("fp32", "bf16"),
                  on_row=lambda rows: seen.append(len(rows)))
    assert seen == [1, 2, 3, 4]         # the caller can save after every row
    assert [(r["method"], r["precision"]) for r in rows] == [
        ("bp", "fp32"), ("dgl+mlaan", "fp32"), ("bp", "bf16"), ("dgl+mlaan", "bf16")]
    bp, mlaan = rows[:2]
    assert bp["paper_gb"] == 3.37 and mlaan["paper_gb"] == 2.62
    assert bp["per_rank_bytes"] is None and len(mlaan["per_rank_bytes"]) == 2
    assert all(0 < b < mlaan["single_process_bytes"] for b in mlaan["per_rank_bytes"])
    assert len(mlaan["per_rank_step_s"]) == 2 and mlaan["single_step_s"] > 0


def test_table3_accounting_rows_carry_parts_that_scale_with_the_batch():
    """CPU rows keep what is saved for backward, the state and the P2P buffers apart, so a
    figure can be scaled to the paper's batch: at the measured batch the parts add up to the
    total, and doubling the batch doubles exactly the parts that grow with it."""
    from benchmarks.table3 import METHODS, scaled_bytes, table3
    nets = [("ResNet-32 (K=16)", "resnet8", 4, "cifar")]
    mlaan = [m for m in METHODS if m[0] == "dgl+mlaan"]
    small, big = (table3(2, b, b, methods=mlaan, nets=nets)[0] for b in (8, 16))
    assert scaled_bytes(small["single_process_parts"], 1) == small["single_process_bytes"]
    for r in range(2):
        parts = small["per_rank_parts"][r]
        assert scaled_bytes(parts, 1) == small["per_rank_bytes"][r]
        assert big["per_rank_parts"][r]["state_bytes"] == parts["state_bytes"]
        assert big["per_rank_parts"][r]["comm_bytes"] == 2 * parts["comm_bytes"]
    assert big["single_process_parts"]["activation_bytes"] > \
        small["single_process_parts"]["activation_bytes"]


def test_table3_measures_the_rows_that_matter_first():
    """A GPU check cut short by its time limit keeps the paper's comparisons: BP and
    DGL+MLAAN in fp32, ResNet-110 first, then bf16, then the other methods."""
    from benchmarks.table3 import METHODS, TABLE3, table3_order
    order = [(n[1], m[0], p) for n, m, p in table3_order(TABLE3, METHODS, ("fp32", "bf16"))]
    assert order[:6] == [("resnet110", "bp", "fp32"), ("resnet110", "dgl+mlaan", "fp32"),
                         ("resnet32", "bp", "fp32"), ("resnet32", "dgl+mlaan", "fp32"),
                         ("resnet34", "bp", "fp32"), ("resnet34", "dgl+mlaan", "fp32")]
    assert order[6] == ("resnet110", "bp", "bf16")
    assert {m for _, m, _ in order[12:]} == {"dgl", "infopro", "infopro+mlaan"}
    assert len(order) == 3 * 5 * 2


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


# ---- memory a user can trust on GPUs: the parts testable without one ------------------------
@pytest.mark.parametrize("visible,logical,uuid,first", [
    (None, 1, None, ("index", 1)),                        # nothing remaps: NVML's index
    ("2,3", 1, None, ("index", 3)),                       # SLURM's CUDA_VISIBLE_DEVICES=2,3
    ("GPU-aaa,GPU-bbb", 1, None, ("uuid", "GPU-bbb")),    # devices named by UUID
    ("MIG-ccc", 0, None, ("uuid", "MIG-ccc")),
    ("2,3", 0, "1234-abcd", ("uuid", "GPU-1234-abcd")),   # torch's UUID beats any index
    ("3", 0, "GPU-77", ("uuid", "GPU-77")),
])
def test_nvml_is_asked_for_the_physical_gpu_behind_a_logical_device(visible, logical, uuid,
                                                                     first):
    from pipemlaan.metrics import gpu_candidates
    got = gpu_candidates(logical, visible, uuid)
    assert got[0] == first
    if visible and uuid:      # the CUDA_VISIBLE_DEVICES entry stays as the fallback
        entry = visible.split(",")[logical]
        assert got[1] == (("index", int(entry)) if entry.isdigit() else ("uuid", entry))


def test_a_tracker_limited_to_steps_traces_those_steps_only():
    from pipemlaan.metrics import SavedTensorTracker
    w = torch.randn(64, 64, requires_grad=True)
    tracker = SavedTensorTracker(steps=2)
    assert not tracker.always and tracker.enabled
    kept = []
    for _ in range(2):
        with tracker.track():
            kept.append((torch.randn(32, 64) @ w).tanh())
    traced = tracker.peak
    assert traced >= 2 * 32 * 64 * 4 and not tracker.enabled
    with tracker.track():      # past the traced steps: no hook, nothing counted
        kept.append((torch.randn(512, 64) @ w).tanh())
    assert tracker.peak == traced
    assert SavedTensorTracker().always


def test_startup_peak_reset_is_a_no_op_off_cuda():
    from pipemlaan.metrics import host_total_bytes, reset_peaks
    assert reset_peaks(torch.device("cpu")) == {}
    assert host_total_bytes() > 2**30

"""benchmarks/projection.py: the cost model's arithmetic, the projection from stage times
measured on one device (run here on CPU), and the report of a pipeline whose ranks shared
one device.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_projection.py -q
"""

import json

import pytest

from benchmarks.projection import (Setup, bp_1f1b_images_per_s, bp_ddp_images_per_s, main,
                                   predict, stage_time)


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


def test_cost_model_hides_transfers_behind_compute_only_up_to_its_length():
    s = Setup(costs=[1.0, 1.0], boundary_bytes=[100, 100], grad_bytes=[0, 0], batch=1)
    # each rank moves one activation and one window gradient: 200 bytes at 100 B/s = 2 s
    hidden = predict(s, [1, 1], bandwidth=100.0, overlap=1.0)["images_per_s"]
    exposed = predict(s, [1, 1], bandwidth=100.0, overlap=0.0)["images_per_s"]
    assert hidden == pytest.approx(1 / 2)          # the 2 s link, 1 s of it behind compute
    assert exposed == pytest.approx(1 / 3)
    assert predict(s, [1, 1], bandwidth=400.0)["images_per_s"] == pytest.approx(1.0)
    assert stage_time(3.0, 1.0, overlap=0.5, allreduce=0.25) == pytest.approx(3.75)


def test_bp_baselines_bubble_and_data_parallel():
    # 1F1B: 8 micro-batches over 4 stages take 11 slots of the slowest stage
    assert bp_1f1b_images_per_s(1024, 8, [0.01, 0.02, 0.01, 0.01]) == \
        pytest.approx(1024 / (11 * 0.02))
    # DDP: the all-reduce hides behind the step unless it is longer
    assert bp_ddp_images_per_s(1024, 0.1, 100, 4, bandwidth=1e9) == pytest.approx(10240)
    assert bp_ddp_images_per_s(1024, 0.1, 4e8, 4, bandwidth=1e9) == \
        pytest.approx(1024 / (2 * 3 / 4 * 0.4))


def test_measure_runs_on_cpu_and_projects_from_measured_stage_times(tmp_path):
    """`measure` with the CPU's clock: every figure present and labelled projected, the
    pipeline set by its slowest measured stage, BP's 1F1B with its bubble, BP's DDP at
    batch/N, the stages x replicas layout on 8 devices; then the shared-device report of a
    (synthetic) throughput result beside it."""
    shared = tmp_path / "throughput.json"
    per_rank = {str(r): {"compute_frac": 0.5, "recv_wait_frac": 0.2, "send_wait_frac": 0.1}
                for r in range(2)}
    shared.write_text(json.dumps({
        "args": {"model": "resnet8", "K": 4, "image": [3, 16, 16], "batch": 32,
                 "variants": [["", []]]},
        "results": {"dgl+mlaan single": {"median": 100.0, "cuda_graph": None},
                    "dgl+mlaan 2 ranks": {"median": 150.0, "partition": [2, 2],
                                          "per_rank": per_rank}}}))
    out = tmp_path / "proj.json"
    assert main(["measure", "--device", "cpu", "--model", "resnet8", "--K", "4", "--batch",
                 "32", "--image", "3,16,16", "--stages", "2", "--steps", "2", "--warmup", "1",
                 "--shared", str(shared), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["projected"]
    assert all(r["projected"] for r in rows)
    st = res["measured"]["stages"]["2"]
    pipe = next(r for r in rows if r["configuration"] == "pipemlaan DGL+MLAAN, 2 stages")
    assert pipe["images_per_s"] == pytest.approx(32 / max(st["stage_step_s"]), rel=1e-3)
    # beside the single process the shared-device run measured (100 img/s there)
    assert pipe["vs_single_process_measured"] == pytest.approx(pipe["images_per_s"] / 100)
    f1b = next(r for r in rows if "1F1B" in r["configuration"])
    assert f1b["images_per_s"] == pytest.approx(32 / ((8 + 2 - 1) *
                                                     max(st["bp_1f1b_stage_fwd_bwd_s"])))
    ddp = next(r for r in rows if "DDP" in r["configuration"])
    assert ddp["images_per_s"] == pytest.approx(32 / res["measured"]["bp_ddp_step_s"]["2"])
    eight = next(r for r in rows if r["gpus"] == 8)
    assert (eight["stages"], eight["replicas"]) == (2, 4)
    assert set(res["measured"]["single_process_images_per_s"]) == {"bp", "dgl+mlaan"}
    assert st["boundaries"][0]["activation_bytes"] > 0
    (row,) = res["shared_gpu"]["rows"]
    assert row["measured"] and row["pipeline_vs_single"] == pytest.approx(1.5)
    r0 = row["per_rank"][0]
    assert (r0["compute"], r0["recv_wait"], r0["send_wait"]) == (0.5, 0.2, 0.1)
    assert r0["other"] == pytest.approx(0.2)
    assert r0["staging_estimated"] == 0.0          # CPU ranks hand gloo their tensors


def test_flops_projection_of_the_readme_layouts():
    """`flops` (the README's multi-node table): ResNet-32 K=16 on 4 GPUs as 4 stages."""
    from benchmarks.projection import project_flops
    rows = project_flops("resnet32", 16, "dgl+mlaan", 1024, [(1, 1), (4, 4), (8, 4)])
    one, four, eight = rows
    assert one["speedup"] == pytest.approx(1.0) and all(r["projected"] for r in rows)
    assert 2.5 < four["speedup"] <= 4.0 and four["replicas"] == 1
    assert eight["replicas"] == 2 and eight["images_per_s"] > four["images_per_s"]

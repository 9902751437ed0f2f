"""The GPU path on a one-GPU machine: ranks that share the GPU (gloo through pinned host
buffers), checked against the single process on the same GPU.

- lockstep pipelines of 2 and 4 ranks on one GPU equal the single process on the GPU
  (train.deterministic on; per-step losses, parameters, evaluation within 1e-5) for
  dgl+mlaan, infopro+mlaan, and BP as 2 data-parallel replicas;
- async 4 ranks train and finish; replicas 2 x 2 run and stay identical;
- bf16 autocast + channels-last run and train;
- a dead rank on the GPU ends the job with the rank named, as on CPU;
- a single-process step replayed as a CUDA graph (engine/graphs.py) equals the eager step
  (fp32 and bf16), and a NaN planted on the device inside the graph is skipped and reported;
- train.compile (engine/compiled.py): a compiled step, replayed as a CUDA graph, agrees with
  the eager step within fp32 / bf16 tolerances, and compiled pipeline ranks sharing the GPU
  agree with the eager single process (`-k compile`, what the GPU check runs first).

Skipped without CUDA (CI has none). Run on a GPU machine:
  cd /work/main && OMP_NUM_THREADS=1 python -m pytest -q -m gpu tests/test_gpu.py
(benchmarks/gpu_check.sh runs them with the GPU figures).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipemlaan.config import method_flags

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
RTOL, ATOL = 1e-5, 1e-6
BASE = ["--data.name=synthetic", "--data.synthetic_image=[3,32,32]", "--model.name=resnet20",
        "--train.bf16=false",  # bf16 sends bf16 activations: equal to one process only in fp32
        "--model.K=4", "--train.batch_size=64", "--data.synthetic_size=512",
        "--train.epochs=2", "--run.progress=false", "--run.log_every=1",
        "--train.device=cuda", "--train.deterministic=true", "--run.overwrite=true"]
METHODS = {m: method_flags(m) for m in ("dgl+mlaan", "infopro+mlaan")}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train(tmp: Path, name: str, ranks: int, extra: list[str], timeout: int = 300) -> dict:
    args = [*BASE, f"--run.dir={tmp}", f"--run.name={name}", *extra]
    cmd = ([sys.executable, "-m", "pipemlaan.train", *args] if ranks == 1 else
           [TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", "-m", "pipemlaan.train",
            *args])
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    run = tmp / name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"summary": json.loads((run / "summary.json").read_text()), "records": records,
            "stdout": proc.stdout}


def losses(res: dict) -> dict[tuple[int, int], float]:
    """(step, module) -> the loss over the whole batch: replicas each log their slice's, and the
    slices are equal, so the batch's is their mean."""
    parts: dict[tuple[int, int], list[float]] = {}
    for r in res["records"]:
        if r.get("kind") == "train":
            for k, v in r["losses"].items():
                parts.setdefault((r["step"], int(k)), []).append(v)
    return {key: sum(v) / len(v) for key, v in parts.items()}


def assert_equal_runs(ref: dict, got: dict) -> None:
    a, b = losses(ref), losses(got)
    assert set(a) == set(b)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=RTOL, abs=ATOL), key
    sa, sb = ref["summary"], got["summary"]
    assert sb["param_checksum"] == pytest.approx(sa["param_checksum"], rel=RTOL, abs=1e-4)
    assert sb["per_module_test_error"] == pytest.approx(sa["per_module_test_error"], abs=1e-6)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("ranks", [2, 4])
def test_lockstep_ranks_on_one_gpu_equal_the_single_process(tmp, method, ranks):
    flags = [*METHODS[method], "--pipeline.mode=lockstep"]
    ref = train(tmp, f"single-{method}", 1, flags)
    got = train(tmp, f"lock{ranks}-{method}", ranks, flags)
    assert "share 1 GPU" in got["stdout"] or torch.cuda.device_count() >= ranks
    assert got["summary"]["world_size"] == ranks
    assert_equal_runs(ref, got)


def test_bp_replicas_on_one_gpu_equal_the_single_process(tmp):
    flags = ["--method.name=bp", "--method.mlm=false", "--method.lam=false",
             "--pipeline.mode=lockstep", "--train.lr=0.02"]
    ref = train(tmp, "single-bp", 1, flags)
    got = train(tmp, "bp-2rep", 2, [*flags, "--pipeline.replicas=2", "--pipeline.sync_bn=true"])
    assert_equal_runs(ref, got)


def test_async_four_ranks_and_replicas_train_on_one_gpu(tmp):
    """Async 4 ranks with 2 batches in flight end where one process emulating that pipeline
    ends (pipeline.emulate_async; bit for bit on CPU, tests/test_inprocess.py). (This short
    run stays at chance level on the synthetic task in one process too: 91.8% on CPU, so
    accuracy is no check here.)"""
    flags = [*METHODS["dgl+mlaan"], "--pipeline.mode=async", "--pipeline.in_flight=2"]
    res = train(tmp, "async4", 4, flags)
    counts = res["summary"]["partition"]       # modules per rank
    emulated = train(tmp, "async4-emulated", 1,
                     [*flags, f"--pipeline.emulate_async=[{','.join(map(str, counts))}]"])
    assert emulated["summary"]["cuda_graph"]["off"] == "pipeline.emulate_async runs eagerly"
    assert_equal_runs(emulated, res)
    rep = train(tmp, "rep2x2", 4, [*METHODS["dgl+mlaan"], "--pipeline.replicas=2"])
    sums = rep["summary"]["param_checksum_per_rank"]
    assert sums[0] == sums[2] and sums[1] == sums[3]        # replicas stay identical


def test_bf16_and_channels_last_train(tmp):
    res = train(tmp, "bf16", 2, [*METHODS["dgl+mlaan"], "--train.bf16=true",
                                 "--train.channels_last=true", "--train.deterministic=false"])
    first = [v for (s, k), v in losses(res).items() if s == 1]
    last = [v for (s, k), v in losses(res).items() if s == max(s for s, _ in losses(res))]
    assert sum(last) < sum(first)
    assert all(math.isfinite(v) for v in losses(res).values())


def test_a_dead_rank_on_the_gpu_ends_the_job_naming_it(tmp):
    args = [*BASE, f"--run.dir={tmp}", "--run.name=dead", *METHODS["dgl+mlaan"],
            "--train.epochs=50", "--pipeline.timeout_s=30"]
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m",
                             "pipemlaan.train", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp / "dead" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.5)
    out = subprocess.run(["pgrep", "-f", "pipemlaan.train.*run.name=dead"],
                         capture_output=True, text=True).stdout.split()
    workers = sorted(int(p) for p in out if int(p) != proc.pid)
    assert workers, "no worker process found"
    os.kill(workers[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert "rank" in err and ("died" in err or "stopped" in err or "failed" in err), err[-2000:]


@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_graph_replay_equals_eager_steps(tmp, bf16):
    """2 epochs of 8 steps: 3 eager warm-up steps, a capture, then replays, with an
    evaluation between the epochs (eager) and a new learning rate every step (warm-up)."""
    flags = [*METHODS["dgl+mlaan"], f"--train.bf16={str(bf16).lower()}",
             "--train.warmup_epochs=1", "--train.lr_mult_g=1.3"]
    ref = train(tmp, f"eager-{bf16}", 1, [*flags, "--train.cuda_graphs=false"])
    got = train(tmp, f"graph-{bf16}", 1, flags)
    assert ref["summary"]["cuda_graph"]["off"] == "train.cuda_graphs=false"
    assert got["summary"]["cuda_graph"] == {"replayed_steps": 13, "eager_steps": 3,
                                            "off": None}, got["summary"]["cuda_graph"]
    assert_equal_runs(ref, got)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_planted_inside_the_cuda_graph_is_skipped_and_reported(tmp, monkeypatch, mode):
    """Module 2's body gradient is flagged non-finite at step 5, a replayed step, through the
    device step tensor the graph reads: skip mode counts one skipped update and finishes with
    finite weights; stop mode ends at the next logging step naming module 2 and step 5."""
    from pipemlaan.config import load_config
    from pipemlaan.engine import updates as updates_mod
    from pipemlaan.engine.distributed import DistEnv
    from pipemlaan.engine.trainer import Trainer
    from pipemlaan.errors import PipemlaanError
    original = updates_mod.Updates._guarded_step

    def planted(self, k, params, finite, lr, step):
        if k == 2 and params is self.body_params[k]:
            finite = finite & (self._step_dev != 5)
        return original(self, k, params, finite, lr, step)
    monkeypatch.setattr(updates_mod.Updates, "_guarded_step", planted)
    cfg = load_config(None, [*BASE, *METHODS["dgl+mlaan"], f"--train.nonfinite={mode}",
                             "--train.epochs=1", "--run.log_every=4", f"--run.dir={tmp}",
                             f"--run.name=nan-{mode}"])
    trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cuda"), None, None))
    try:
        if mode == "stop":
            with pytest.raises(PipemlaanError, match=r"module 2 .* at step 5"):
                trainer.train()
            assert trainer.graphed.replays >= 2
            return
        out = trainer.train()
    finally:
        trainer.close()
    assert out["cuda_graph"]["replayed_steps"] == 5
    assert out["skipped_updates"] == {"2": 1}
    for m in trainer.stage.modules.values():
        assert all(torch.isfinite(p).all() for p in m.parameters())


# ---- train.compile -----------------------------------------------------------------------------
# inductor's kernels round differently from ATen's (fused batch-norm statistics, reductions in
# another order): equal within these, over 6 steps at lr 0.1
COMPILE_TOL = {False: dict(rel=1e-4, abs=1e-5), True: dict(rel=3e-2, abs=1e-3)}


def _in_process(tmp: Path, name: str, flags: list[str]) -> dict:
    """A single-process run in this process (so its stage can be looked at afterwards)."""
    from pipemlaan.config import load_config
    from pipemlaan.engine.distributed import DistEnv
    from pipemlaan.engine.trainer import Trainer
    cfg = load_config(None, [*BASE, f"--run.dir={tmp}", f"--run.name={name}", *flags])
    trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cuda"), None, None))
    try:
        out = trainer.train()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text()
               .splitlines()]
    return {"summary": out, "records": records, "stage": trainer.stage}


def assert_close_runs(ref: dict, got: dict, bf16: bool) -> None:
    a, b = losses(ref), losses(got)
    assert set(a) == set(b) and a
    for key in a:
        assert b[key] == pytest.approx(a[key], **COMPILE_TOL[bf16]), key
    assert got["summary"]["param_checksum"] == pytest.approx(
        ref["summary"]["param_checksum"], **COMPILE_TOL[bf16])


@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_cuda_graph_steps_agree_with_eager_steps(tmp, bf16):
    """6 steps: 3 eager warm-up steps (which compile every module), a capture of the compiled
    step, 2 replays; against 6 eager steps without compilation or graph."""
    flags = [*METHODS["dgl+mlaan"], f"--train.bf16={str(bf16).lower()}", "--train.epochs=1",
             "--train.max_steps=6", "--train.lr_mult_g=1.3"]
    ref = _in_process(tmp, f"eager-nocompile-{bf16}", [*flags, "--train.cuda_graphs=false"])
    got = _in_process(tmp, f"compiled-graph-{bf16}", [*flags, "--train.compile=on"])
    report = got["stage"].compiled.report()
    assert report["off"] is None and report["compiled_modules"] > 0, report
    assert got["summary"]["cuda_graph"] == {"replayed_steps": 3, "eager_steps": 3,
                                            "off": None}, got["summary"]["cuda_graph"]
    assert ref["stage"].compiled is None
    assert_close_runs(ref, got, bf16)


def test_compiled_pipeline_ranks_on_one_gpu_agree_with_the_single_process(tmp):
    """Lockstep 2 ranks sharing the GPU, each compiling its own modules (no CUDA graph on
    pipeline ranks), against the eager single process, fp32."""
    flags = [*METHODS["dgl+mlaan"], "--pipeline.mode=lockstep", "--train.epochs=1",
             "--train.max_steps=6"]
    ref = train(tmp, "single-eager-c", 1, [*flags, "--train.cuda_graphs=false"])
    got = train(tmp, "lock2-compiled", 2, [*flags, "--train.compile=on"])
    for line in got["stdout"].splitlines():
        assert "torch.compile failed" not in line and "runs eagerly" not in line, line
    assert_close_runs(ref, got, bf16=False)


def test_each_rank_reports_its_own_training_memory_on_the_gpu(tmp):
    """Start-up never puts another rank's modules on a rank's device (the partition is counted,
    not timed on rank 0) and peaks are reset when start-up ends: rank 0, owning the stem module
    alone, peaks below the parameters of the modules it does not own, its saved-for-backward
    bytes come from traced steps (non-zero on CUDA too), and NVML reads the GPU it runs on."""
    from pipemlaan.data import dataset_spec
    from pipemlaan.config import load_config
    from pipemlaan.local.module import build_local_modules
    flags = ["--model.name=resnet56", "--model.K=4", "--pipeline.mode=lockstep",
             "--pipeline.partition=[1,3]", "--train.max_steps=6", "--train.epochs=1"]
    res = train(tmp, "own-memory", 2, flags)
    s = res["summary"]
    cfg = load_config(None, [*BASE, *flags])
    _, modules = build_local_modules(cfg, dataset_spec(cfg.data))
    others = sum(p.numel() * p.element_size() for m in modules[1:] for p in m.parameters())
    assert s["peak_memory_bytes"][0] < others, (s["peak_memory_bytes"], others)
    assert s["peak_memory_bytes"][0] < s["peak_memory_bytes"][1]
    assert all(a > 0 for a in s["activation_bytes"]), s["activation_bytes"]
    assert all(0 < share < 1 for share in s["memory_share"]), s["memory_share"]
    assert all("startup_max_allocated" in m for m in s["startup_memory"])
    # the CUDA graph is not held back by the few traced steps of a single process
    one = train(tmp, "graphed-traced", 1, ["--train.max_steps=8", "--train.epochs=1"])
    assert one["summary"]["activation_bytes"][0] > 0
    assert one["summary"]["cuda_graph"]["replayed_steps"] > 0, one["summary"]["cuda_graph"]


def test_nvml_reads_the_physical_gpu_torch_runs_on():
    import pynvml
    from pipemlaan.metrics import nvml_handle
    handle = nvml_handle(torch.device("cuda", 0))
    assert handle is not None
    want = str(torch.cuda.get_device_properties(0).uuid)
    assert want in pynvml.nvmlDeviceGetUUID(handle)

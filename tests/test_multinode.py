"""Two "nodes" on one machine: two launch/multi_node.sh processes (torchrun --nnodes=2, c10d
rendezvous on 127.0.0.1, gloo) train a lockstep pipeline that equals the single-process run, and
refuse to start when the nodes' run.dir are not one folder. The launch scripts parse (bash -n),
and launch/slurm.sbatch's torchrun line (DRY_RUN=1, SLURM's variables set by hand) takes its
ranks per node from the GPUs SLURM granted and its run folder from the run's name.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_multinode.py -q
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = "configs/fmnist_mlaan_cpu.toml"   # overridden below to a tiny synthetic run
TINY = ["--data.name=synthetic", "--data.synthetic_size=128", "--data.synthetic_image=[3,8,8]",
        "--model.name=resnet8", "--model.K=4",
        "--method.first_modules_head=true", "--method.heads=compact",
        "--train.batch_size=16", "--train.epochs=1",
        "--run.progress=false", "--pipeline.mode=lockstep", "--train.device=cpu",
        "--pipeline.timeout_s=60"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_states(run: Path) -> dict[str, dict]:
    step = sorted((run / "checkpoints").glob("step_*"))[-1]
    return {f.name: torch.load(f, weights_only=True)["module"] for f in step.glob("module_*.pt")}


def test_two_nodes_equal_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHRUN": str(BIN / "torchrun")}
    single = subprocess.run([sys.executable, "-m", "pipemlaan.train", "--config", CONFIG, *TINY,
                             f"--run.dir={tmp_path}", "--run.name=single"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]

    procs, outputs = _two_nodes(tmp_path, [tmp_path, tmp_path], "nodes")
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    ref, got = _final_states(tmp_path / "single"), _final_states(tmp_path / "nodes")
    assert ref.keys() == got.keys() and len(ref) == 4
    for name in ref:
        for key, t in ref[name].items():
            if t.is_floating_point():
                assert torch.allclose(t, got[name][key], rtol=1e-5, atol=1e-6), (name, key)
    summary = (tmp_path / "nodes" / "summary.json").read_text()
    assert '"world_size": 4' in summary


def _two_nodes(tmp_path, run_dirs, name):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHRUN": str(BIN / "torchrun")}
    procs = []
    try:
        for node in (0, 1):
            node_env = {**env, "NNODES": "2", "NODE_RANK": str(node),
                        "RDZV": f"127.0.0.1:{port}", "RUN_ID": f"test{port}"}
            procs.append(subprocess.Popen(
                ["bash", str(REPO / "launch" / "multi_node.sh"), "2", CONFIG, *TINY,
                 f"--run.dir={run_dirs[node]}", f"--run.name={name}"], cwd=REPO,
                env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True))
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return procs, outputs


@pytest.mark.slow
def test_nodes_that_do_not_share_run_dir_stop_with_one_error(tmp_path):
    """Node 1 writes its run folder elsewhere than node 0 (as a node-local disk would): every
    rank stops at start-up, before training, with one line naming node 1 and the fix."""
    procs, outputs = _two_nodes(tmp_path, [tmp_path / "shared", tmp_path / "local"], "split")
    for p, out in zip(procs, outputs):
        assert p.returncode != 0, out[-3000:]
    text = "\n".join(outputs)
    assert "is not one folder shared by every node: node 1" in text, text[-3000:]
    assert "mounted at the same path on every node" in text
    assert not (tmp_path / "shared" / "split" / "checkpoints").exists()
    assert not list((tmp_path / "shared").glob(".pipemlaan-probe-*"))     # cleaned up


@pytest.mark.parametrize("script", ["launch/single_node.sh", "launch/multi_node.sh",
                                    "launch/slurm.sbatch", "benchmarks/gpu_check.sh"])
def test_launch_scripts_parse(script):
    got = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr


def _slurm_dry_run(tmp_path, env_extra, *overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("OMP_NUM_THREADS", None)
    env.update({"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "RDZV_HOST": "n001",
                "DRY_RUN": "1", "PYTHON": sys.executable, "RUN_DIR": str(tmp_path)},
               **env_extra)
    return subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"),
                           "configs/paper/cifar10_dgl_mlaan.toml", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_slurm_script_takes_ranks_and_threads_from_the_allocation(tmp_path):
    for granted, nproc, cpus, threads in (({"SLURM_GPUS_ON_NODE": "4"}, 4, "32", "8"),
                                          ({"SLURM_GPUS_PER_NODE": "h100:8"}, 8, "64", "8")):
        got = _slurm_dry_run(tmp_path, {**granted, "SLURM_CPUS_PER_TASK": cpus},
                             "--data.root=/data/cifar10")
        assert got.returncode == 0, got.stderr
        line = shlex.split(got.stdout.strip().splitlines()[-1])
        assert line[:2] == ["srun", "torchrun"]
        assert f"--nproc_per_node={nproc}" in line and "--nnodes=2" in line
        assert "--rdzv_endpoint=n001:29500" in line and "--data.root=/data/cifar10" in line
        assert f"OMP_NUM_THREADS={threads}" in got.stdout
        assert "--run.resume=true" not in line
    none = _slurm_dry_run(tmp_path, {"SLURM_CPUS_PER_TASK": "32"})
    assert none.returncode == 2 and "sbatch --gpus-per-node=N" in none.stderr


def test_slurm_run_folder_is_named_by_the_run_and_resumed(tmp_path):
    """No job id in the folder: a requeue and a new submission land in the same one and
    resume it; the name is RUN_NAME, else pipemlaan's own default for the config."""
    gpus = {"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "16"}
    got = _slurm_dry_run(tmp_path, gpus, "--model.name=resnet110", "--model.K=55")
    assert got.returncode == 0, got.stderr
    assert f"run folder {tmp_path}/cifar10-resnet110-K55-dgl-mlaan" in got.stdout
    named = _slurm_dry_run(tmp_path, {**gpus, "RUN_NAME": "r110"})
    line = shlex.split(named.stdout.strip().splitlines()[-1])
    assert "--run.name=r110" in line and "--run.resume=true" not in line
    step = tmp_path / "r110" / "checkpoints" / "step_00000100"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    again = _slurm_dry_run(tmp_path, {**gpus, "RUN_NAME": "r110", "SLURM_JOB_ID": "5151"})
    line = shlex.split(again.stdout.strip().splitlines()[-1])
    assert "--run.resume=true" in line and f"resuming {tmp_path}/r110" in again.stdout

"""Two "nodes" on one machine: two launch/multi_node.sh processes (torchrun --nnodes=2, c10d
rendezvous on 127.0.0.1, gloo) train a lockstep pipeline that equals the single-process run.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_multinode.py -q
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

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

    port = _free_port()
    procs = []
    try:
        for node in (0, 1):
            node_env = {**env, "NNODES": "2", "NODE_RANK": str(node),
                        "RDZV": f"127.0.0.1:{port}", "RUN_ID": f"test{port}"}
            procs.append(subprocess.Popen(
                ["bash", str(REPO / "launch" / "multi_node.sh"), "2", CONFIG, *TINY,
                 f"--run.dir={tmp_path}", "--run.name=nodes"], cwd=REPO, env=node_env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True))
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
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

"""On CPU, what ranks sharing a GPU rely on: the backend choice and its one-line errors, and the
host-staged transport (every exchanged tensor through a host buffer) giving the same training
as direct exchanges. The CUDA side of the staging is the same code with device tensors; it runs
in the GPU check (benchmarks/gpu_check.sh) where a GPU is at hand. Also the per-rank traces of
run.profile_steps (what a user opens in Perfetto to see where a rank waits).

Run: cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_host_staging.py -q
"""

from __future__ import annotations

import pytest
import torch

from pipemlaan.engine.comm import HostStagedComm, LocalComm, LocalWorld
from pipemlaan.engine.distributed import choose_backend
from pipemlaan.errors import ConfigError

from inprocess import run_ranks


def test_one_gpu_per_rank_uses_nccl_directly():
    assert choose_backend("auto", True, local_world=4, gpus=4) == ("nccl", False, "")
    assert choose_backend("nccl", True, local_world=2, gpus=8) == ("nccl", False, "")
    assert choose_backend("auto", False, local_world=4, gpus=0) == ("gloo", False, "")


def test_ranks_sharing_a_gpu_go_through_host_memory_and_say_so():
    backend, staged, note = choose_backend("auto", True, local_world=4, gpus=1)
    assert (backend, staged) == ("gloo", True)
    assert "4 ranks share 1 GPU" in note and "slower" in note
    backend, staged, note = choose_backend("gloo", True, local_world=1, gpus=1)
    assert (backend, staged) == ("gloo", True) and "pipeline.backend=gloo" in note


def test_nccl_on_a_shared_gpu_stops_with_the_fix():
    with pytest.raises(ConfigError) as e:
        choose_backend("nccl", True, local_world=2, gpus=1)
    msg = str(e.value)
    assert "2 ranks share 1 GPU" in msg and "--pipeline.backend=gloo" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="use gloo on CPU"):
        choose_backend("nccl", False, local_world=2, gpus=0)


def test_staged_exchanges_and_all_reduce_deliver_the_same_values():
    shared = LocalWorld(2, timeout_s=10)
    a, b = (HostStagedComm(LocalComm(shared, r), stage_all=True) for r in (0, 1))
    for c in (a, b):
        c.create_groups({"pipe:0-1": (0, 1)})
    x = torch.arange(12.0).reshape(3, 4)
    got = torch.zeros(3, 4)
    (ws,) = a.post([(True, x, 1, "pipe:0-1")])
    (wr,) = b.post([(False, got, 0, "pipe:0-1")])
    x.add_(100)     # the send staged its bytes when posted: later writes must not travel
    b.wait(wr, 0, "test")
    a.wait(ws, 1, "test")
    assert torch.equal(got, torch.arange(12.0).reshape(3, 4))


TINY = ["--data.name=synthetic", "--data.synthetic_image=[3,8,8]", "--model.name=resnet8",
        "--model.K=4", "--method.first_modules_head=true", "--method.heads=compact",
        "--train.batch_size=16", "--run.progress=false", "--run.log_every=1",
        "--train.device=cpu", "--data.synthetic_size=64", "--train.epochs=2",
        "--method.name=infopro", "--method.mlm=true", "--method.lam=true",
        "--pipeline.mode=lockstep", "--run.overwrite=true"]


def test_a_host_staged_pipeline_equals_the_direct_one(tmp_path):
    """Activations, labels, images, window gradients and LAM weights all go through host
    buffers on 4 ranks (replicas' all-reduces on 2x2): same training as direct exchanges."""
    base = TINY + [f"--run.dir={tmp_path}"]
    ref = run_ranks(base + ["--run.name=direct"], 4)["summary"]
    staged = run_ranks(base + ["--run.name=staged"], 4, host_staged=True)["summary"]
    assert staged["param_checksum"] == ref["param_checksum"]
    assert staged["per_module_test_error"] == ref["per_module_test_error"]
    rep = ["--pipeline.replicas=2", "--pipeline.sync_bn=true"]
    ref = run_ranks(base + rep + ["--run.name=direct-rep"], 4)["summary"]
    staged = run_ranks(base + rep + ["--run.name=staged-rep"], 4, host_staged=True)["summary"]
    assert staged["param_checksum_per_rank"] == ref["param_checksum_per_rank"]



def test_profile_steps_write_a_trace_per_rank_with_the_stage_names(tmp_path):
    """run.profile_steps traces the given steps on every rank, into <run>/traces/rankR.json,
    with the stage's record_function names (where a rank computes, where it waits). The
    profiler is process-wide, so ranks are processes here (torchrun), not threads; the run
    must also finish cleanly after the trace (a freed profiler once crashed it)."""
    import json
    import subprocess

    from launching import REPO, TORCHRUN, launch_env
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m",
                           "pipemlaan.train", *TINY, f"--run.dir={tmp_path}",
                           "--run.name=traced", "--run.profile_steps=[1,2]"],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "traced" / "summary.json").exists()
    for r in (0, 1):
        trace = json.loads((tmp_path / "traced" / "traces" / f"rank{r}.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert any(n.startswith("module ") and n.endswith(" forward") for n in names), r
    from pipemlaan.config import load_config
    with pytest.raises(ConfigError, match="profile_steps"):
        load_config(None, ["--run.profile_steps=[3,1]"])

"""The DDP baseline (benchmarks/ddp_bp.py) trains exactly what pipemlaan's BP trains: 2 ranks
of torch's DistributedDataParallel end with the parameters of pipemlaan's BP as 2 data-parallel
replicas (same config, data slices, optimizer and schedule), and write the records the
benchmarks read (train lines with the data wait, eval lines with training seconds, summary).

Run: cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_ddp_bp.py -q
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.ddp_bp import main
from inprocess import run_ranks
from launching import launch_env, run_to_end, train_command, unique_name

FLAGS = ["--data.name=synthetic", "--train.max_steps=4", "--data.test_subset=64",
         "--run.log_every=2", "--run.overwrite=true", "--run.progress=false",
         "--train.batch_size=32", "--data.synthetic_size=256"]
BP = ["--method.name=bp", "--method.mlm=false", "--method.lam=false", "--model.K=1"]


@pytest.mark.slow
def test_ddp_on_two_ranks_equals_pipemlaan_bp_replicas(tmp_path):
    name = unique_name("ddp")
    ddp = run_to_end(train_command(2, [*FLAGS, f"--run.dir={tmp_path}", f"--run.name={name}",
                                       "--train.eval_every_steps=2"],
                                   program=["-m", "benchmarks.ddp_bp"]),
                     tmp_path / "ddp", name, env=launch_env())
    assert ddp.poll() == 0, ddp.stderr_text[-2000:]
    # pipemlaan's BP as 2 replicas, its ranks in this process (tests/inprocess.py)
    want = run_ranks([*FLAGS, *BP, "--pipeline.replicas=2", f"--run.dir={tmp_path}",
                      f"--run.name={name}-ref"], 2)["summary"]
    got = json.loads((tmp_path / name / "summary.json").read_text())
    assert math.isclose(got["param_checksum"], want["param_checksum"], rel_tol=1e-6)
    assert got["test_top1_error"] == want["test_top1_error"]
    assert got["world_size"] == 2 and got["method"] == "bp ddp"
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert {r["rank"] for r in train} == {0, 1}
    assert all(0 <= r["data_wait_frac"] < 1 and r["images_per_s"] > 0 for r in train)
    evals = [r for r in lines if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[0]["train_s"] < evals[1]["train_s"]


def test_ddp_refuses_a_batch_that_does_not_split(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main([*FLAGS, f"--run.dir={tmp_path}"]) == 2
    assert "multiple of 3" in capsys.readouterr().err

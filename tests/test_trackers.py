"""Trackers (pipemlaan/trackers.py): TensorBoard event files read back with tensorboard's own
reader, a resumed run appending to them, Weights & Biases in offline mode read back from its
run file, and the one line a missing package gets.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_trackers.py -q
"""

from __future__ import annotations

import glob
import json
import struct
import sys
import time

import pytest
from torch.utils.tensorboard import SummaryWriter

from inprocess import run_ranks
from pipemlaan.trackers import (FanOut, TensorBoardTracker, Threaded, Tracker, open_trackers,
                                scalars)
from runs import TINY
from timelines import check_tensorboard, read_scalars

# 4 steps (steps_per_epoch 4 with 64 samples), one evaluation at the end
SHORT = [*TINY, "--data.synthetic_size=64", "--data.test_subset=32", "--train.epochs=1",
         "--run.progress=false"]


@pytest.mark.slow
def test_a_pipeline_s_event_files_read_back(tmp_path):
    """2 ranks: each rank's folder has its modules' losses at every step (metrics.jsonl's
    values), images/s, time shares, memory, the learning rate; rank 0 the evaluation."""
    run_ranks([*SHORT, "--pipeline.partition=[2,2]", f"--run.dir={tmp_path}",
               "--run.name=run"], 2)
    got = check_tensorboard(tmp_path / "run", 2)
    assert {t for t in got[0] if t.startswith("loss/")} == {"loss/module_0", "loss/module_1"}
    assert {t for t in got[1] if t.startswith("loss/")} == {"loss/module_2", "loss/module_3"}
    assert not any(t.startswith("eval/") for t in got[1])


@pytest.mark.slow
def test_a_resumed_run_appends_and_drops_what_followed_its_checkpoint(tmp_path):
    """The first launch stops at step 2 with a checkpoint. Then, as if it had gone on past the
    checkpoint before dying, a writer adds a loss at step 3. The resumed launch logs steps 3-4
    into a new event file: the reader keeps steps 1-2 of the first launch and 3-4 of the
    second, each once, and the stray step-3 value is gone."""
    base = [*SHORT, "--pipeline.partition=[2,2]", f"--run.dir={tmp_path}", "--run.name=run"]
    run_ranks([*base, "--train.max_steps=2"], 2)
    folder = tmp_path / "run" / "tensorboard" / "rank1"
    stray = SummaryWriter(str(folder))
    stray.add_scalar("loss/module_3", 1234.0, 3)
    stray.close()
    run_ranks([*base, "--run.resume=true"], 2)
    assert len(list(folder.glob("events.out.tfevents.*"))) == 3
    losses = read_scalars(folder)["loss/module_3"]
    assert sorted(losses) == [1, 2, 3, 4] and losses[3] != 1234.0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {x["step"]: x["losses"]["3"] for x in lines if x["kind"] == "train" and
              x["rank"] == 1}
    assert losses == pytest.approx(logged, rel=1e-6)


def _wandb_history(run_file: str) -> list[dict]:
    """The history records of a W&B run file (LevelDB-style log of wandb_internal_pb2 Records:
    a 7-byte header, 32 KiB blocks, records of crc(4) length(2) type(1) data)."""
    from wandb.proto import wandb_internal_pb2
    data, out, pos, buf = open(run_file, "rb").read(), [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in rec.history.item})
    return out


@pytest.mark.slow
def test_wandb_offline_logs_the_run(tmp_path, monkeypatch):
    """One process, run.wandb=true, WANDB_MODE=offline: the W&B run file holds every step's
    losses (metrics.jsonl's values) and the evaluation."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_ranks([*SHORT, "--run.wandb=true", "--run.tensorboard=false",
               f"--run.dir={tmp_path}", "--run.name=run"], 1)
    files = glob.glob(str(tmp_path / "run" / "wandb" / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(files) == 1, files
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = {x["step"] for x in lines if x["kind"] == "train"}
    # wandb's own service process writes the file; on a loaded machine its last records can
    # land a moment after run.finish() returned (seen once in a full suite)
    deadline = time.monotonic() + 30
    while True:
        hist = _wandb_history(files[0])
        if steps <= {h.get("_step") for h in hist if "loss/module_3" in h} or \
                time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for x in (x for x in lines if x["kind"] == "train"):
        row = next(h for h in hist if h.get("_step") == x["step"] and "loss/module_3" in h)
        assert row["loss/module_3"] == pytest.approx(x["losses"]["3"], rel=1e-6)
    ev = next(x for x in lines if x["kind"] == "eval")
    assert any(h.get("eval/test_top1_error") == pytest.approx(ev["test_top1_error"])
               for h in hist)
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_missing_package_is_one_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """wandb (or tensorboard) not importable: one line naming the fix; the other tracker
    still works, and with neither the loop gets the null tracker."""
    monkeypatch.setitem(sys.modules, "wandb", None)       # `import wandb` raises ImportError
    t = open_trackers(tmp_path, 0, tensorboard=True, wandb=True, start_step=0, name="x",
                      config={})
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["run.wandb is on but wandb is not installed (pip install wandb); logging "
                   "to metrics.jsonl and TensorBoard only"]
    assert isinstance(t, Threaded) and isinstance(t.inner, TensorBoardTracker)
    t.log({"loss/module_0": 1.5}, 1)
    t.close()
    assert read_scalars(tmp_path / "tensorboard" / "rank0") == {"loss/module_0": {1: 1.5}}
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    t = open_trackers(tmp_path, 0, tensorboard=True, wandb=True, start_step=0, name="x",
                      config={})
    out = capsys.readouterr().out
    assert "pip install tensorboard, or pass --run.tensorboard=false" in out
    assert type(t) is Tracker
    # other ranks stay quiet: rank 0 speaks for the run
    open_trackers(tmp_path, 1, tensorboard=False, wandb=True, start_step=0, name="x",
                  config={})
    assert capsys.readouterr().out == ""


def test_every_numeric_field_becomes_a_tag():
    """Fields a record gains later (FLOP rates, time buckets) reach the trackers as they are."""
    rec = {"kind": "train", "step": 5, "epoch": 0, "rank": 1, "replica": 0, "stage": 1,
           "modules": [2, 3], "lr": 0.1, "losses": {"2": 1.0, "3": 2.0}, "images_per_s": 90.0,
           "compute_frac": 0.7, "recv_wait_frac": 0.2, "peak_memory_bytes": 3 * 2 ** 20,
           "tflops": 1.5, "peak_share": 0.3, "buckets": {"data": 0.01, "lam": 0.02},
           "name": "not a number", "flag": True, "missing": None}
    assert scalars(rec) == {
        "train/lr": 0.1, "train/epoch": 0.0, "loss/module_2": 1.0, "loss/module_3": 2.0,
        "throughput/images_per_s": 90.0, "time/compute_frac": 0.7,
        "time/recv_wait_frac": 0.2, "memory/peak_memory_mib": 3.0, "throughput/tflops": 1.5,
        "throughput/peak_share": 0.3, "train/buckets/data": 0.01, "train/buckets/lam": 0.02}
    ev = {"kind": "eval", "step": 8, "epoch": 1, "rank": 0, "per_module_test_error":
          [None, 50.0], "test_top1_error": 50.0, "test_top5_error": 10.0}
    assert scalars(ev) == {"eval/epoch": 1.0, "eval/per_module_test_error/module_1": 50.0,
                           "eval/test_top1_error": 50.0, "eval/test_top5_error": 10.0}


def test_fan_out_logs_to_each():
    seen = []

    class Rec(Tracker):
        def log(self, metrics, step):
            seen.append((self, metrics, step))
    a, b = Rec(), Rec()
    FanOut([a, b]).log({"x": 1.0}, 3)
    assert seen == [(a, {"x": 1.0}, 3), (b, {"x": 1.0}, 3)]

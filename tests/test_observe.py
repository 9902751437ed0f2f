"""What a run shows and records for the people watching it (issue 26): plain progress lines when
stdout is not a terminal, the start-up banner, provenance kept for every start, FLOP
utilisation per rank, and a step's time split into parts that add up.

- plain lines: their fields, one write per line, rows of ranks that lag a window, the last
  line with every rank; the choice of view by terminal;
- FLOPs: the counting rule (6 x multiply-adds of trained layers, 2 x those of the forward-only
  EMA twin), the peak table, the measured CPU peak, the override;
- the step clock: nested spans counted once, parts that add up to the window;
- in one process (a thread per rank), 2 replicas with LAM: every part of a step in the records,
  FLOP rates in records and summary; resumed, the run folder keeps both starts' config and
  provenance;
- under torchrun, 2 CPU ranks with stdout to a file (as under SLURM): the banner and a progress
  line at least every run.log_every steps, provenance from both ranks.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_observe.py -q
"""

from __future__ import annotations

import io
import json
import re
import time
import tomllib

import pytest
import torch
from rich.console import Console
from torch import nn

from pipemlaan import flops, provenance, ui
from pipemlaan.engine.p2p import StepClock
from pipemlaan.metrics import read_metrics

from inprocess import run_ranks
from launching import run_to_end, train_cmd, unique_name
from runs import MLAAN, TINY

PROGRESS = re.compile(r"^step (\d+)/(\d+) epoch \d+ \| \d+ img/s \| eta [0-9:]+ \| loss ")


def record(rank: int, step: int, loss: float | None = 1.5, tflops: float = 0.01,
           share: float | None = 0.2) -> dict:
    return {"kind": "train", "step": step, "epoch": 0, "rank": rank, "modules": [rank],
            "losses": {} if loss is None else {str(rank): loss}, "images_per_s": 100.0,
            "recv_wait_frac": 0.25, "send_wait_frac": 0.05, "compute_frac": 0.5,
            "peak_memory_bytes": 3 * 2**20, "tflops": tflops, "peak_share": share}


class Writes(io.StringIO):
    """A console file that keeps every write apart."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


# ---- plain progress lines --------------------------------------------------------------------
def test_plain_lines_show_every_field_and_let_lagging_ranks_catch_up(tmp_path, monkeypatch):
    out = Writes()
    monkeypatch.setattr(ui, "console", Console(file=out, width=80))
    path = tmp_path / "metrics.jsonl"
    view = ui.progress_view(path, world=2, title="run")
    assert isinstance(view, ui.PlainView)
    view.start(total=20, done=0)
    view.update(1, {})                          # not a logging step: nothing printed
    assert out.writes == []
    view.update(5, record(0, 5, loss=None))     # rank 1's line of step 5 is not there yet
    with open(path, "a") as f:
        f.write(json.dumps(record(1, 5, loss=0.75, share=None)) + "\n")
    view.stop()
    lines = out.getvalue().splitlines()
    # one write per line: ranks sharing a log never interleave within a line
    assert all(w.count("\n") == 1 and w.endswith("\n") for w in out.writes), out.writes
    assert len(lines) == 2, lines
    first, last = lines
    assert PROGRESS.match(first) and first.startswith("step 5/20 epoch 0 | 100 img/s")
    assert "loss r0 - |" in first and "r1" not in first
    # stop() read the lagging rank's line: the last line has every rank
    fields = dict(f.split(" ", 1) for f in last.split(" | ")[3:])
    assert fields == {"loss": "r0 - r1 0.750", "mem": "r0 3 MiB r1 3 MiB",
                      "wait": "r0 30% r1 30%", "tflops": "r0 0.01 (20%) r1 0.01 (?)"}


def test_live_view_on_a_terminal_plain_lines_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setattr(ui, "console", Console(file=io.StringIO(), force_terminal=True))
    assert isinstance(ui.progress_view(tmp_path / "m.jsonl", 2, "run"), ui.LiveView)
    monkeypatch.setattr(ui, "console", Console(file=io.StringIO()))
    assert isinstance(ui.progress_view(tmp_path / "m.jsonl", 2, "run"), ui.PlainView)


# ---- FLOPs -----------------------------------------------------------------------------------
class Module(nn.Module):
    """The parts of a local module the counter reads."""

    def __init__(self, body, g=None, h=None):
        super().__init__()
        self.body, self.g, self.h = body, g, h


class Head(nn.Module):
    def __init__(self, live: nn.Module, twin: nn.Module):
        super().__init__()
        self.live, self.twin = live, twin
        self.twin.requires_grad_(False)

    def forward(self, x, labels, images):
        return self.live(x) + self.twin(x)


def test_training_flops_are_six_macs_trained_and_two_macs_forward_only():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    macs = 8 * 8 * 8 * 3 * 9                 # outputs x (inputs x kernel) at 8x8
    x = torch.zeros(1, 3, 8, 8)
    assert flops.layer_macs(conv, conv(x)) == macs
    m = Module(conv)
    m.train()
    count, out = flops.module_training_flops(m, torch.zeros(2, 3, 8, 8), x)
    assert count == 6 * macs and out.shape == (2, 8, 8, 8)
    assert m.training and conv.training, "the counter must give the modules their mode back"
    head = Module(nn.Conv2d(3, 8, 3, padding=1),
                  h=Head(nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)))
    head_macs = 8 * 8 * 4 * 8
    assert flops.training_flops_per_image([head], (3, 8, 8), (3, 8, 8)) == \
        [6 * macs + 6 * head_macs + 2 * head_macs]


def test_peaks_by_gpu_name_override_and_measured_cpu():
    assert flops.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert flops.gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert flops.gpu_peak_tflops("NVIDIA H100 NVL", "bf16") == 835.0
    assert flops.gpu_peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert flops.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert flops.gpu_peak_tflops("NVIDIA L40S", "fp32") == 91.6
    assert flops.gpu_peak_tflops("Tesla T4", "bf16") is None
    assert flops.device_peak(torch.device("cpu"), "fp32", 12.5) == (12.5, "train.peak_tflops")
    peak, source = flops.device_peak(torch.device("cpu"), "fp32")
    assert peak > 0 and source.startswith("measured")
    assert flops.cpu_matmul_tflops() == peak             # measured once per process
    assert flops.utilisation(1e9, 100.0, 0.5) == pytest.approx((0.1, 0.2))
    assert flops.utilisation(1e9, 100.0, None)[1] is None
    ranks = [{"host": "a", "peak_source": "measured x", "peak_tflops": p} for p in (1.0, 3.0)]
    ranks.append({"host": "b", "peak_source": "measured x", "peak_tflops": 2.0})
    assert [r["peak_tflops"] for r in flops.best_measured_peaks(ranks)] == [3.0, 3.0, 2.0]


# ---- the step clock --------------------------------------------------------------------------
def test_step_clock_counts_nested_spans_once_and_parts_add_up():
    clock = StepClock(torch.device("cpu"))
    t0 = time.perf_counter()
    with clock.measure("compute"):
        with clock.measure("allreduce"):
            time.sleep(0.01)
    with clock.measure("data"):
        pass
    elapsed = time.perf_counter() - t0
    parts = clock.parts(elapsed)
    assert parts["allreduce"] >= 0.01
    assert parts["compute"] >= 0 and parts["data"] >= 0 and parts["other"] >= 0
    assert sum(parts.values()) == pytest.approx(elapsed, abs=1e-9)


# ---- in one process: 2 replicas with LAM, then resumed ---------------------------------------
DP = [*TINY, *MLAAN, "--data.synthetic_size=64", "--pipeline.replicas=2", "--run.log_every=2"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("observe")
    args = [*DP, f"--run.dir={root}", "--run.name=dp"]
    first = run_ranks([*args, "--train.epochs=1"], 2)
    second = run_ranks([*args, "--train.epochs=2", "--run.resume=true"], 2)
    return first, second


def test_every_part_of_a_step_is_in_the_records(resumed):
    first, _ = resumed
    lines = [r for r in first["metrics"] if r["kind"] == "train"]
    assert sorted({r["rank"] for r in lines}) == [0, 1]
    names = ("compute", "recv_wait", "send_wait", "data_wait", "lam", "allreduce", "other")
    for r in lines:
        assert sum(r[f"{n}_s"] for n in names) == pytest.approx(r["window_s"], abs=1e-6)
        assert sum(r[f"{n}_frac"] for n in names) == pytest.approx(1.0, abs=1e-6)
        assert all(r[f"{n}_s"] >= 0 for n in names if n != "other"), r
        # both ranks are a first stage (2 replicas of one stage): each loads its batches
        assert r["data_wait_s"] > 0 and r["allreduce_s"] > 0 and r["lam_s"] > 0, r
        assert r["flops_per_image"] > 0 and r["tflops"] > 0 and 0 < r["peak_share"], r
        assert r["tflops"] == pytest.approx(
            r["flops_per_image"] * r["images_per_s"] / 2 / 1e12)   # a replica: half a batch
    s = first["summary"]
    assert len(s["tflops"]) == len(s["peak_share"]) == 2
    assert all(t > 0 for t in s["tflops"]) and all(p > 0 for p in s["peak_share"])


def test_a_resumed_run_keeps_every_start_s_config_and_provenance(resumed):
    _, second = resumed
    run = second["run_dir"]
    starts = sorted(p.name for p in (run / "starts").iterdir())
    assert starts == ["000", "001"]
    configs = [tomllib.loads((run / "starts" / s / "config.toml").read_text()) for s in starts]
    assert [c["train"]["epochs"] for c in configs] == [1, 2]
    assert not configs[0]["run"]["resume"] and configs[1]["run"]["resume"]
    # config.toml stays the latest start's, the one a reader loads back
    assert (run / "config.toml").read_text() == (run / "starts/001/config.toml").read_text()
    for s in starts:
        prov = json.loads((run / "starts" / s / "provenance.json").read_text())
        assert prov["world"] == 2 and prov["replicas"] == 2 and prov["argv"]
        assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["python"]
        git = prov["git"]          # null outside a git checkout (an installed package)
        if provenance.git_state()["commit"] is None:
            assert git == {"commit": None, "dirty": None}
        else:
            assert re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and \
                isinstance(git["dirty"], bool)
        assert [r["rank"] for r in prov["ranks"]] == [0, 1]
        assert all(r["host"] and r["device_name"] and r["params"] > 0 for r in prov["ranks"])


# ---- under torchrun, stdout to a file ---------------------------------------------------------
@pytest.mark.slow
def test_torchrun_log_file_has_the_banner_and_a_progress_line_every_log_every_steps(tmp_path):
    name = unique_name("plain")
    every, steps = 5, 20
    args = [*TINY, *MLAAN, "--data.synthetic_size=256", f"--train.max_steps={steps}",
            f"--run.log_every={every}", "--data.test_subset=32", f"--run.dir={tmp_path}",
            f"--run.name={name}"]
    proc = run_to_end(train_cmd(2, args), tmp_path / "torchrun", name)
    assert proc.popen.returncode == 0, proc.describe()
    out = proc.stdout_text.splitlines()
    assert f"pipemlaan: run {tmp_path / name} | world 2 = 1 replica(s) x 2 stage(s) | gloo " \
        f"on cpu" in out, proc.describe()
    assert any(line.startswith("  stage 1 (rank 1): modules ") for line in out)
    assert any(line.startswith(f"  steps {steps} ") and "precision fp32" in line
               for line in out)
    progress = [PROGRESS.match(line) for line in out]
    shown = [int(m.group(1)) for m in progress if m]
    assert all(int(m.group(2)) == steps for m in progress if m)
    assert sorted(set(shown)) == list(range(every, steps + 1, every)), proc.describe()
    last = [line for line in out if PROGRESS.match(line)][-1]
    assert "loss r0 " in last and " r1 " in last and "img/s" in last
    prov = json.loads((tmp_path / name / "starts/000/provenance.json").read_text())
    assert [r["rank"] for r in prov["ranks"]] == [0, 1] and prov["backend"] == "gloo"
    lines = read_metrics(tmp_path / name / "metrics.jsonl")
    assert {r["rank"] for r in lines if r["kind"] == "train" and r["tflops"] > 0} == {0, 1}

"""The live view on rank 0 (pipemlaan/ui.py) shows every record a rank can write, rendered
without a terminal as under CI, nohup or SLURM.

Run: .venv/bin/python -m pytest tests/test_ui.py -q
"""

from __future__ import annotations

import io
import json

from rich.console import Console

from pipemlaan import ui


def record(rank: int, modules: list[int], losses: dict[int, float]) -> dict:
    return {"kind": "train", "step": 20, "epoch": 0, "rank": rank, "modules": modules,
            "losses": {str(k): v for k, v in losses.items()}, "images_per_s": 100.0,
            "compute_frac": 0.5, "recv_wait_frac": 0.25, "send_wait_frac": 0.0}


def shown(view: ui.LiveView) -> str:
    out = io.StringIO()
    Console(file=out, width=120).print(view._render())
    return out.getvalue()


def test_deepest_loss_skips_modules_without_a_loss_of_their_own():
    assert ui.deepest_loss(record(0, [0], {})) is None                  # reference plan's stem
    assert ui.deepest_loss(record(0, [0, 1], {0: 2.0})) == 2.0          # MLM: last via window
    assert ui.deepest_loss(record(1, [2, 3], {2: 1.5, 3: 0.7})) == 0.7


def test_live_view_shows_a_rank_without_a_head(tmp_path, monkeypatch):
    """The 4-rank default run: rank 0 holds module 0 alone, which has no head under the
    reference plan; its first log line used to end the run (KeyError in update)."""
    path = tmp_path / "metrics.jsonl"
    later = [record(1, [1], {1: 1.9}), record(3, [3], {3: 0.8})]
    path.write_text("".join(json.dumps(r) + "\n" for r in later))
    monkeypatch.setattr(ui, "console", Console(file=io.StringIO(), width=120))
    view = ui.LiveView(path, world=4, title="run")
    view.start(total=100, done=0)
    try:
        view.update(20, record(0, [0], {}))
        text = shown(view)
        rows = {line.split()[0]: line for line in text.splitlines()[1:] if line.strip()}
        assert "no head" in rows["0"]
        assert "0.800" in rows["3"] and "1.900" in rows["1"]
        # the bar reports the network's loss: the last rank's deepest head
        assert view.progress.tasks[0].fields["info"].endswith("loss 0.800")
        view.update(21, {})
    finally:
        view.stop()


def test_live_view_before_any_rank_has_a_loss(tmp_path, monkeypatch):
    monkeypatch.setattr(ui, "console", Console(file=io.StringIO(), width=120))
    view = ui.LiveView(tmp_path / "metrics.jsonl", world=2, title="run")
    view.start(total=10, done=0)
    try:
        view.update(1, record(0, [0, 1], {}))
        assert view.progress.tasks[0].fields["info"].endswith("loss no head")
    finally:
        view.stop()

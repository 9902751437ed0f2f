"""What rank 0 shows: a rich progress bar with a live view of every stage, and result tables.

The other ranks' figures reach rank 0 through metrics.jsonl (every rank appends to it), so the
view costs the pipeline no communication. A null view is used when progress is off or on
other ranks, so the training loop never branches on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

console = Console(stderr=False)


def deepest_loss(record: dict) -> float | None:
    """The loss of the deepest module in a train record that has one; None when none of the
    rank's modules has a loss of its own (the headless first modules of the reference plan,
    a rank whose last module is trained only through a window)."""
    for k in reversed(record["modules"]):
        if str(k) in record["losses"]:
            return record["losses"][str(k)]
    return None


def _fmt_loss(loss: float | None) -> str:
    return "no head" if loss is None else f"{loss:.3f}"


class NullView:
    def start(self, total: int, done: int) -> None: ...
    def update(self, step: int, record: dict) -> None: ...
    def stop(self) -> None: ...


class LiveView(NullView):
    """Progress bar (images/s, loss, ETA) plus one row per stage, refreshed as metrics arrive."""

    def __init__(self, metrics_path: Path, world: int, title: str):
        self.path, self.world, self.title = metrics_path, world, title
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=console)
        self.rows: dict[int, dict] = {}
        self._offset = 0
        self.live: Live | None = None

    def start(self, total: int, done: int) -> None:
        self.task = self.progress.add_task(self.title, total=total, completed=done, info="")
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False)
        self.live.start()

    def _poll(self) -> None:
        try:
            with open(self.path) as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind("\n") + 1]
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "train":
                self.rows[rec["rank"]] = rec

    def _render(self):
        table = Table(box=None, pad_edge=False, header_style="dim")
        for col in ("rank", "modules", "img/s", "compute", "recv wait", "send wait", "loss (deepest head)"):
            table.add_column(col, justify="right")
        for r in sorted(self.rows):
            rec = self.rows[r]
            mods = rec["modules"]
            table.add_row(str(r), f"{mods[0]}-{mods[-1]}", f"{rec['images_per_s']:.0f}",
                          f"{rec['compute_frac']:.0%}", f"{rec['recv_wait_frac']:.0%}",
                          f"{rec['send_wait_frac']:.0%}", _fmt_loss(deepest_loss(rec)))
        return Group(self.progress, table) if self.world > 1 else self.progress

    def update(self, step: int, record: dict) -> None:
        self._poll()
        if record:
            self.rows[record["rank"]] = record
            # the deepest loss any rank has reported: the network's own once the last rank's
            # lines arrive, rank 0's deepest head before that
            losses = [deepest_loss(self.rows[r]) for r in sorted(self.rows, reverse=True)]
            loss = next((v for v in losses if v is not None), None)
            self.progress.update(self.task, completed=step,
                                 info=f"{record['images_per_s']:.0f} img/s  loss "
                                      f"{_fmt_loss(loss)}")
        else:
            self.progress.update(self.task, completed=step)
        if self.live:
            self.live.update(self._render())

    def stop(self) -> None:
        if self.live:
            # the last frame shows every rank: by the run's end (after the summary's gather)
            # every rank's last line is in metrics.jsonl
            self._poll()
            self.live.update(self._render())
            self.live.stop()
            self.live = None
            if not console.is_terminal:     # rich leaves the last frame's line open there
                console.line()


def results_table(summary: dict) -> Table:
    t = Table(title=f"{summary['method']} {summary['model']} K={summary['K']} on "
                    f"{summary['dataset']}, {summary['world_size']} rank(s)"
                    + (f" = {summary['replicas']} replicas x {summary['stages']} stages"
                       if summary.get("replicas", 1) > 1 else ""))
    t.add_column("module", justify="right")
    t.add_column("test error (its head)", justify="right")
    for k, e in enumerate(summary["per_module_test_error"]):
        t.add_row(str(k), "no head" if e is None else f"{e:.2f}%")
    t.add_section()
    t.add_row("top-1 error", f"{summary['test_top1_error']:.2f}%")
    t.add_row("top-5 error", f"{summary['test_top5_error']:.2f}%")
    t.add_row("images/s", f"{summary['images_per_s']:.1f}")
    t.add_row("wall time", f"{summary['wall_s']:.1f} s")
    for r, (peak, act) in enumerate(zip(summary["peak_memory_bytes"],
                                        summary["activation_bytes"])):
        t.add_row(f"rank {r} memory", f"{peak / 2**20:.1f} MiB (activations {act / 2**20:.1f})")
    return t

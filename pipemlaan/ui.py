"""What rank 0 shows: a start-up banner, the progress of training, and result tables.

Progress is a rich progress bar with a live view of every stage on a terminal (`LiveView`),
and plain lines elsewhere (`PlainView`: a SLURM log, nohup, CI), one every run.log_every
steps. The other ranks' figures reach rank 0 through metrics.jsonl (every rank appends to it),
so neither view costs the pipeline any communication. A null view is used when progress is
off or on other ranks, so the training loop never branches on it.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
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


def _fmt_share(share: float | None) -> str:
    return "?" if share is None else f"{share:.0%}"


def say(line: str) -> None:
    """One line to the console's output in one write, so that lines of ranks sharing a
    terminal or a log file never interleave, and without rich's markup or wrapping."""
    console.file.write(line + "\n")
    console.file.flush()


def banner(lines: list[str]) -> None:
    for line in lines:
        say(line)


def progress_view(metrics_path: Path, world: int, title: str) -> "NullView":
    """The live view on a terminal, plain lines anywhere else."""
    cls = LiveView if console.is_terminal else PlainView
    return cls(metrics_path, world, title)


class _Rows:
    """The newest train record of every rank, read from metrics.jsonl as it grows."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[int, dict] = {}
        self._offset = 0

    def poll(self) -> None:
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
        self._rows = _Rows(metrics_path)
        self.rows = self._rows.rows
        self.live: Live | None = None

    def start(self, total: int, done: int) -> None:
        self.task = self.progress.add_task(self.title, total=total, completed=done, info="")
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False)
        self.live.start()

    def _poll(self) -> None:
        self._rows.poll()

    def _render(self):
        table = Table(box=None, pad_edge=False, header_style="dim")
        for col in ("rank", "modules", "img/s", "compute", "recv wait", "send wait", "TFLOP/s",
                    "of peak", "loss (deepest head)"):
            table.add_column(col, justify="right")
        for r in sorted(self.rows):
            rec = self.rows[r]
            mods = rec["modules"]
            table.add_row(str(r), f"{mods[0]}-{mods[-1]}", f"{rec['images_per_s']:.0f}",
                          f"{rec['compute_frac']:.0%}", f"{rec['recv_wait_frac']:.0%}",
                          f"{rec['send_wait_frac']:.0%}", f"{rec.get('tflops', 0.0):.3g}",
                          _fmt_share(rec.get("peak_share")), _fmt_loss(deepest_loss(rec)))
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
                                 info=f"{record['images_per_s']:.0f} img/s  "
                                      f"{record.get('tflops', 0.0):.3g} TFLOP/s "
                                      f"({_fmt_share(record.get('peak_share'))} of peak)  "
                                      f"loss {_fmt_loss(loss)}")
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


class PlainView(NullView):
    """Plain progress lines, for output that is not a terminal: on each logging step, one line
    with step/total, epoch, images/s, ETA, and per rank its deepest head's loss ("-": none of
    its modules has a loss of its own), peak memory, the share of the window it waited on its
    peers, and its achieved TFLOP/s with its share of the device's peak ("?": unknown peak).
    Other ranks' figures may be a window behind rank 0's (their lines reach metrics.jsonl
    later); `stop` reads once more and prints a last line with every rank's final window."""

    def __init__(self, metrics_path: Path, world: int, title: str):
        self.world, self.title = world, title
        self._rows = _Rows(metrics_path)
        self.total = self.done = self.step = 0
        self.t0 = time.monotonic()
        self.epoch, self.images_per_s = 0, 0.0
        self._shown: dict[int, int] = {}     # rank -> the step of its record last shown

    def start(self, total: int, done: int) -> None:
        self.total, self.done, self.step = total, done, done
        self.t0 = time.monotonic()

    def update(self, step: int, record: dict) -> None:
        self.step = step
        if not record:
            return
        self._rows.poll()
        self._rows.rows[record["rank"]] = record
        self.epoch, self.images_per_s = record["epoch"], record["images_per_s"]
        say(self.line())

    def line(self) -> str:
        rows = [self._rows.rows[r] for r in sorted(self._rows.rows)]
        self._shown = {r["rank"]: r["step"] for r in rows}
        ran = self.step - self.done
        eta = ((time.monotonic() - self.t0) / ran * (self.total - self.step)) if ran > 0 else 0

        def per(fmt) -> str:
            return " ".join(f"r{r['rank']} {fmt(r)}" for r in rows)
        return " | ".join([
            f"step {self.step}/{self.total} epoch {self.epoch}",
            f"{self.images_per_s:.0f} img/s",
            f"eta {timedelta(seconds=round(eta))}",
            "loss " + per(lambda r: "-" if deepest_loss(r) is None
                          else f"{deepest_loss(r):.3f}"),
            "mem " + per(lambda r: f"{r['peak_memory_bytes'] / 2**20:.0f} MiB"),
            "wait " + per(lambda r: f"{r['recv_wait_frac'] + r['send_wait_frac']:.0%}"),
            "tflops " + per(lambda r: f"{r.get('tflops', 0.0):.3g} "
                                      f"({_fmt_share(r.get('peak_share'))})"),
        ])

    def stop(self) -> None:
        # by the run's end (after the summary's gather) every rank's last line is there
        self._rows.poll()
        if {r: rec["step"] for r, rec in self._rows.rows.items()} != self._shown:
            say(self.line())


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
    for r, (tflops, share) in enumerate(zip(summary.get("tflops", []),
                                            summary.get("peak_share", []))):
        t.add_row(f"rank {r} TFLOP/s", f"{tflops:.3g} ({_fmt_share(share)} of peak)")
    return t

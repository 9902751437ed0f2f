"""LAM parameter broadcaster: EMA twins follow live blocks that may live on later ranks.

Each twin keeps a *snapshot* of the live block it follows. A snapshot is refreshed at the start
of every step t with t % lam_sync_every == 0, from the live block as it stands after step t-1
(at a run's first step: the initial or resumed weights; between sync steps the snapshot is the
last one taken, and it is checkpointed with the module):
- a block on the same rank is read directly;
- a block owned by a later rank is sent by its owner, on a process group of its own, right
  after the owner's step t-1 ("publish"), as one flat tensor per (owner, receiver) pair.
Then every twin (or, with method.ema_only_last, only the last module's) takes one EMA step
toward its snapshot. Lockstep mode waits for each snapshot, so it equals the single process;
async mode only takes snapshots that have already arrived and never blocks the forward stream,
then drains what is left at the end.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from pipemlaan.engine.watchdog import peer_failure
from pipemlaan.local.module import LocalModule, block_state, ema_update


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(flat[i:i + t.numel()].view_as(t).to(t.dtype))
        i += t.numel()
    return out


class LamSync:
    def __init__(self, cfg, rank: int, modules: dict[int, LocalModule], all_modules: list,
                 owner_of_block: dict[int, int], live_blocks: dict[int, torch.nn.Module],
                 total_steps: int, group=None, device=None):
        self.every = cfg.pipeline.lam_sync_every
        self.decay = cfg.method.ema_decay
        self.lockstep = cfg.pipeline.mode == "lockstep"
        self.timeout = timedelta(seconds=cfg.pipeline.timeout_s)
        self.rank, self.group, self.total = rank, group, total_steps
        self.device = device
        twins = [m for m in all_modules if m.twin is not None]
        last_twin = max((m.index for m in twins), default=None)
        self.twins = [m for m in modules.values() if m.twin is not None
                      and (not cfg.method.ema_only_last or m.index == last_twin)]
        self.live = live_blocks                      # block index -> live block on this rank
        # snapshot per followed block (initially the twin itself: copies start equal to live)
        self.snap: dict[int, list[torch.Tensor]] = {
            m.twin_source: [t.detach().clone() for t in block_state(m.twin)] for m in self.twins}
        self.local_sources = sorted(b for b in self.snap if owner_of_block[b] == rank)
        # what this rank receives from each owner, and sends to each receiver
        self.recv_from: dict[int, list[int]] = {}
        for b in sorted(self.snap):
            if owner_of_block[b] != rank:
                self.recv_from.setdefault(owner_of_block[b], []).append(b)
        self.send_to: dict[int, list[int]] = {}
        for m in all_modules:
            if m.twin is None or (cfg.method.ema_only_last and m.index != last_twin):
                continue
            b = m.twin_source
            recv_rank = _owner_of_module(m.index, owner_of_block, all_modules)
            if owner_of_block[b] == rank and recv_rank != rank:
                blocks = self.send_to.setdefault(recv_rank, [])
                if b not in blocks:
                    blocks.append(b)
        for blocks in self.send_to.values():
            blocks.sort()
        self._pending_recv: dict[int, tuple] = {}
        self._remaining: dict[int, int] = {}
        self._sends: list = []

    def _like(self, blocks: list[int]) -> list[torch.Tensor]:
        return [t for b in blocks for t in self.snap[b]]

    def _is_sync_step(self, t: int) -> bool:
        return t % self.every == 0 and t < self.total

    def expected_messages(self, start: int) -> int:
        return sum(1 for t in range(start, self.total) if self._is_sync_step(t))

    # ---- owner side ----------------------------------------------------------------------
    def publish(self, t: int) -> None:
        """Called when the live weights are those that step t will read (after step t-1)."""
        if not self.send_to or not self._is_sync_step(t):
            return
        for q, blocks in self.send_to.items():
            flat = _flat([x for b in blocks for x in block_state(self.live[b])])
            self._sends.append((dist.isend(flat, q, group=self.group), flat, q))
        if self.lockstep:
            self.flush()
        else:
            self._sends = [s for s in self._sends if not s[0].is_completed()]

    def flush(self) -> None:
        for work, _flat_t, q in self._sends:
            self._wait(work, q, "sending LAM weights to")
        self._sends = []

    # ---- receiver side -------------------------------------------------------------------
    def start(self, start_step: int) -> None:
        self._remaining = {q: self.expected_messages(start_step) for q in self.recv_from}
        for q in self.recv_from:
            self._post(q)

    def _post(self, q: int) -> None:
        if self._remaining.get(q, 0) <= 0:
            return
        buf = torch.empty(sum(t.numel() for t in self._like(self.recv_from[q])),
                          device=self.device)
        self._pending_recv[q] = (dist.irecv(buf, q, group=self.group), buf)
        self._remaining[q] -= 1

    def _take(self, q: int) -> None:
        _, buf = self._pending_recv.pop(q)
        blocks = self.recv_from[q]
        for b, new in zip(blocks, _split_blocks(_unflat(buf, self._like(blocks)),
                                                [len(self.snap[b]) for b in blocks])):
            self.snap[b] = new
        self._post(q)

    def before_step(self, t: int) -> None:
        """Refreshes snapshots due at step t, then moves every twin one EMA step."""
        if self._is_sync_step(t):
            for b in self.local_sources:
                self.snap[b] = [x.detach().clone() for x in block_state(self.live[b])]
            for q in list(self._pending_recv):
                work = self._pending_recv[q][0]
                if self.lockstep:
                    self._wait(work, q, "receiving LAM weights from")
                    self._take(q)
                else:
                    while q in self._pending_recv and self._pending_recv[q][0].is_completed():
                        self._wait(self._pending_recv[q][0], q, "receiving LAM weights from")
                        self._take(q)
        for m in self.twins:
            ema_update(m.twin, self.snap[m.twin_source], self.decay)

    def finish(self) -> None:
        """Receives every snapshot still on its way and waits for our own sends."""
        while self._pending_recv:
            q = next(iter(self._pending_recv))
            self._wait(self._pending_recv[q][0], q, "receiving LAM weights from")
            self._take(q)
        self.flush()

    def _wait(self, work, peer: int, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            raise peer_failure(self.rank, f"{what} rank {peer}", peer, e,
                               self.timeout.total_seconds()) from e

    # ---- checkpoints ---------------------------------------------------------------------
    def state(self, module_index: int) -> list[torch.Tensor] | None:
        for m in self.twins:
            if m.index == module_index:
                return [t.clone() for t in self.snap[m.twin_source]]
        return None

    def load_state(self, module_index: int, tensors: list[torch.Tensor]) -> None:
        for m in self.twins:
            if m.index == module_index:
                self.snap[m.twin_source] = [t.to(self.device) for t in tensors]


def _split_blocks(tensors: list[torch.Tensor], sizes: list[int]) -> list[list[torch.Tensor]]:
    out, i = [], 0
    for n in sizes:
        out.append(tensors[i:i + n])
        i += n
    return out


def _owner_of_module(index: int, owner_of_block: dict[int, int], all_modules: list) -> int:
    return owner_of_block[all_modules[index].block_range[0]]

"""LAM parameter broadcaster: EMA twins follow live blocks that may live on later ranks.

Each twin keeps a *snapshot* of the live block it follows. A snapshot is refreshed at the start
of every step t with t % lam_sync_every == 0, from the live block as it stands after step t-1
(at a run's first step: the initial or resumed weights; between sync steps the snapshot is the
last one taken, and it is checkpointed with the module):
- a block on the same rank is read directly;
- a block owned by a later rank is sent by its owner right after the owner's step t-1
  ("publish"), as one flat tensor per (owner, receiver) pair, on a process group of that pair's
  own (the schedule in engine/schedule.py posts and waits; this module packs and unpacks).
Then every twin (or, with method.ema_only_last, only the last module's) takes one EMA step
toward its snapshot. Lockstep mode waits for each snapshot, so it equals the single process.

Async mode takes, at step t, the snapshots published up to step t - lag, with lag = (stages
between owner and receiver) x pipeline.in_flight. Upstream ranks run ahead of downstream ones
by about that many steps, so in steady state the owner has already sent that snapshot and the
wait does not block the forward stream; and the staleness is fixed, so an async run's result
does not depend on timing. (Taking "whatever has arrived" cannot work: gloo's irecv never
reports completion until it is waited on, so the twins would never move.)

A single process that emulates an async pipeline (pipeline.emulate_async, engine/stage.py
[Note: emulated staleness]) gives each twin the same lag through `lags`: it keeps the
snapshots of the last `lag` sync steps and hands the twin the one the pipeline would.

[Note: LAM history] An owner keeps the live weights it published (or, emulating, would have
published) at the last `keep` steps' sync steps, recorded after each step's own work and before
a drain, and a checkpoint stores them with the module that holds the block. A resumed run's
first `lag` steps take snapshots published before its start: the owner publishes them again
from this history (engine/schedule.py `lam_start`), so a resumed async run follows exactly the
snapshots the uninterrupted one would. Resuming on another partition or number of batches in
flight can ask for a step the history does not hold; the newest older one stands in.
"""

from __future__ import annotations

import torch

from pipemlaan.engine.flat import flatten, unflatten
from pipemlaan.local.module import LocalModule, block_state, ema_update


class LamSync:
    """The snapshots a rank's EMA twins follow, and the flat tensors that carry them. Which
    snapshot travels when is the schedule's business (engine/schedule.py): the trainer calls
    `pack` where the schedule publishes and `ema` where it takes snapshots."""

    def __init__(self, cfg, rank: int, modules: dict[int, LocalModule], placement,
                 live_blocks: dict[int, torch.nn.Module], total_steps: int, device=None,
                 lags: dict[int, int] | None = None, keep: int = 0):
        self.every = cfg.pipeline.lam_sync_every
        self.decay = cfg.method.ema_decay
        self.rank, self.total = rank, total_steps
        self.device = device
        replica, _ = placement.seat(rank)
        moving = dict(placement.twins)               # module -> the block its twin follows
        self.twins = [m for k, m in modules.items() if k in moving]
        self.live = live_blocks                      # block index -> live block on this rank
        # snapshot per followed block (initially the twin itself: copies start equal to live)
        self.snap: dict[int, list[torch.Tensor]] = {
            m.twin_source: [t.detach().clone() for t in block_state(m.twin)] for m in self.twins}
        self.local_sources = sorted(b for b in self.snap if placement.owner(b, replica) == rank)
        # what this rank receives from each owner, and sends to each receiver
        self.recv_from: dict[int, list[int]] = {}
        for b in sorted(self.snap):
            if placement.owner(b, replica) != rank:
                self.recv_from.setdefault(placement.owner(b, replica), []).append(b)
        self.send_to: dict[int, list[int]] = {}
        for k, b in placement.twins:
            receiver = placement.rank_of(replica, placement.stage_of_module(k))
            if placement.owner(b, replica) == rank and receiver != rank:
                blocks = self.send_to.setdefault(receiver, [])
                if b not in blocks:
                    blocks.append(b)
        for blocks in self.send_to.values():
            blocks.sort()
        # emulated async: module index -> (followed block, lag in steps), the twin's
        # snapshot, and the history of snapshots per followed block (sync step -> tensors)
        self.lags = {m.index: (m.twin_source, lags[m.index]) for m in self.twins
                     if lags and lags.get(m.index)}
        self.lag_snap = {i: self.snap[b] for i, (b, _) in self.lags.items()}
        # [Note: LAM history] every followed block this rank holds, by block and sync step,
        # kept for `keep` steps (whoever follows it, so checkpoints hold the same entries
        # whatever the partition)
        self.keep = max([keep, *(lag for _, lag in self.lags.values())])
        self.history: dict[int, dict[int, list[torch.Tensor]]] = {
            b: {} for b in sorted(set(moving.values())) if b in live_blocks}

    def _like(self, blocks: list[int]) -> list[torch.Tensor]:
        return [t for b in blocks for t in self.snap[b]]

    def is_sync_step(self, t: int) -> bool:
        return t % self.every == 0 and t < self.total

    # ---- owner side ----------------------------------------------------------------------
    def record(self, t: int) -> None:
        """Keeps the live weights of every published (or lagged) block for sync step t, once:
        called after step t-1's own work, before the drain of a run of steps (so a snapshot
        never holds the drained gradients), and for t = the run's end too (a stopped run's
        successor publishes it: [Note: LAM history])."""
        if t % self.every or t > self.total:
            return
        for b, hist in self.history.items():
            if t not in hist:
                hist[t] = [x.detach().clone() for x in block_state(self.live[b])]
            for u in [u for u in hist if u < t - self.keep]:
                del hist[u]

    def _snapshot(self, b: int, u: int) -> list[torch.Tensor]:
        hist = self.history[b]
        if u in hist:
            return hist[u]
        older = [v for v in hist if v < u]
        return hist[max(older)] if older else block_state(self.live[b])

    def pack(self, receiver: int, u: int) -> torch.Tensor:
        """The weights `receiver` follows at sync step u, as one flat tensor."""
        return flatten([x for b in self.send_to[receiver] for x in self._snapshot(b, u)],
                       torch.float32)

    # ---- receiver side -------------------------------------------------------------------
    def buffer(self, owner: int) -> torch.Tensor:
        return torch.empty(sum(t.numel() for t in self._like(self.recv_from[owner])),
                           device=self.device)

    def ema(self, t: int, received: dict[int, torch.Tensor]) -> None:
        """At the start of step t: refreshes the snapshots due (local blocks at sync steps,
        `received` owner -> flat from other ranks), then moves every twin one EMA step."""
        if self.is_sync_step(t):
            for b in self.local_sources:
                self.snap[b] = [x.detach().clone() for x in block_state(self.live[b])]
        for q, flat in received.items():
            blocks = self.recv_from[q]
            for b, new in zip(blocks, _split_blocks(unflatten(flat, self._like(blocks)),
                                                    [len(self.snap[b]) for b in blocks])):
                self.snap[b] = new
        if self.lags:
            self._take_lagged(t)
        for m in self.twins:
            snap = self.lag_snap.get(m.index, self.snap[m.twin_source])
            ema_update(m.twin, snap, self.decay)

    def _take_lagged(self, t: int) -> None:
        """Emulated async lag: the snapshot an owner rank would have published at t - lag."""
        for i, (b, lag) in self.lags.items():
            u = t - lag
            if u >= 0 and self.is_sync_step(u):
                self.lag_snap[i] = self._snapshot(b, u)

    # ---- checkpoints ---------------------------------------------------------------------
    def state(self, module_index: int) -> list[torch.Tensor] | None:
        """The snapshot module `module_index`'s twin follows now (None: it has no twin here)."""
        for m in self.twins:
            if m.index == module_index:
                snap = self.lag_snap.get(m.index, self.snap[m.twin_source])
                return [t.clone() for t in snap]
        return None

    def history_of(self, blocks: range) -> dict[int, dict[int, list[torch.Tensor]]]:
        """[Note: LAM history] of the given blocks (a module's), block -> sync step -> tensors."""
        return {b: {u: [x.clone() for x in xs] for u, xs in self.history[b].items()}
                for b in blocks if b in self.history}

    def load_state(self, module_index: int, tensors: list[torch.Tensor] | None,
                   history: dict[int, dict[int, list[torch.Tensor]]] | None = None) -> None:
        for m in self.twins:
            if m.index == module_index and tensors is not None:
                snap = [t.to(self.device) for t in tensors]
                if m.index in self.lag_snap:
                    self.lag_snap[m.index] = snap
                else:
                    self.snap[m.twin_source] = snap
        for b, hist in (history or {}).items():
            if b in self.history:
                self.history[b].update({int(u): [x.to(self.device) for x in xs]
                                        for u, xs in hist.items()})


def _split_blocks(tensors: list[torch.Tensor], sizes: list[int]) -> list[list[torch.Tensor]]:
    out, i = [], 0
    for n in sizes:
        out.append(tensors[i:i + n])
        i += n
    return out

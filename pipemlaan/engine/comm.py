"""How ranks reach each other (a `Comm`): torch.distributed, or an in-memory world of threads.
engine/p2p.py's `Transport` sits on top: it owns the buffers of the schedule's messages.

Everything that crosses ranks goes through a `Comm`: point-to-point operations posted as one
group (`post`), gradient all-reduces within a named group, and the object collectives of
start-up, checkpoints, evaluation and the summary. Groups are named as in engine/schedule.py
("world", "pipe:a-b", "lam:o>q", "stage:s").

- `TorchComm`: torch.distributed (gloo on CPU, NCCL on GPUs), one process per rank. Every
  named group is a process group of its own, so NCCL gives each its own communicator.
- `HostStagedComm`: wraps a transport so that device tensors travel through host buffers (gloo
  on ranks that share a GPU, where NCCL refuses to run).
- `LocalComm`: ranks are threads of one process and messages are tensors handed over in memory,
  with gloo's rules (sends buffered, receives matched in order per sender, group and receiver).
  Tests run whole pipelines in one process with it (tests/inprocess.py): the same trainer, the
  same action lists, without starting a Python process per rank.

Every wait has a timeout and raises PipelineError naming the peer (engine/watchdog.py).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist

from pipemlaan.engine.schedule import STOP
from pipemlaan.engine.watchdog import peer_failure
from pipemlaan.errors import PipelineError


class Comm:
    rank: int
    world: int
    timeout_s: float

    def create_groups(self, groups: dict[str, tuple[int, ...]]) -> None:
        raise NotImplementedError

    def post(self, ops: list[tuple[bool, torch.Tensor, int, str]]) -> list:
        """Posts (is_send, tensor, peer, group) operations as one group; returns their works."""
        raise NotImplementedError

    def wait(self, work, peer: int | None, what: str) -> None:
        raise NotImplementedError

    def all_reduce(self, tensor: torch.Tensor, group: str, what: str) -> None:
        raise NotImplementedError

    def start_all_reduce(self, tensor: torch.Tensor, group: str):
        """Starts a sum all-reduce of a host tensor without blocking; `wait` on the result."""
        raise NotImplementedError

    def all_gather_object(self, obj) -> list:
        raise NotImplementedError

    def broadcast_object(self, obj, src: int = 0):
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def doing(self, action) -> None:
        """The trainer's dispatcher names the schedule action it executes (None: none); only
        engine/call_log.py's recorder keeps it."""


class TorchComm(Comm):
    def __init__(self, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.timeout = timedelta(seconds=timeout_s)
        self.groups: dict[str, object] = {"world": None}
        self._members: dict[str, tuple[int, ...]] = {"world": tuple(range(world))}

    def create_groups(self, groups: dict[str, tuple[int, ...]]) -> None:
        for name, members in groups.items():
            if name == "world" or name in self.groups:
                continue
            # every rank creates every group, in the same order (torch.distributed's rule);
            # the stop agreement's rounds run on the host, even beside NCCL (schedule.py
            # [Note: stop agreement])
            g = dist.new_group(list(members), backend="gloo" if name == STOP else None)
            if self.rank in members:
                self.groups[name] = g
                self._members[name] = members

    def post(self, ops):
        try:
            p2p = [dist.P2POp(dist.isend if send else dist.irecv, t, peer,
                              group=self.groups[group]) for send, t, peer, group in ops]
            return dist.batch_isend_irecv(p2p)
        except RuntimeError as e:
            peers = sorted({peer for _, _, peer, _ in ops})
            raise peer_failure(self.rank, f"posting to rank(s) {peers}", peers[0], e) from e

    def wait(self, work, peer, what):
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            raise peer_failure(self.rank, what, peer, e, self.timeout_s) from e

    def all_reduce(self, tensor, group, what):
        work = dist.all_reduce(tensor, group=self.groups[group], async_op=True)
        self.wait(work, None, what)

    def start_all_reduce(self, tensor, group):
        try:
            return dist.all_reduce(tensor, group=self.groups[group], async_op=True)
        except RuntimeError as e:
            raise peer_failure(self.rank, f"starting a collective on {group}", None, e) from e

    def all_gather_object(self, obj):
        out = [None] * self.world
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as e:
            raise peer_failure(self.rank, "exchanging results with every rank", None, e) from e
        return out

    def broadcast_object(self, obj, src=0):
        box = [obj]
        what = f"receiving from rank {src}" if self.rank != src else "sending to every rank"
        try:
            dist.broadcast_object_list(box, src=src)
        except RuntimeError as e:
            raise peer_failure(self.rank, what, None, e) from e
        return box[0]

    def barrier(self):
        try:
            dist.barrier()
        except RuntimeError as e:
            raise peer_failure(self.rank, "waiting for every rank", None, e) from e


class HostStagedComm(Comm):
    """gloo for device tensors: each one travels through a host buffer (pinned where CUDA is
    present), so ranks that share a GPU can exchange activations, gradients and LAM weights,
    and replicas can all-reduce. `stage_all` stages CPU tensors too (what the CPU tests use to
    run these code paths)."""

    def __init__(self, inner: Comm, stage_all: bool = False):
        self.inner, self.stage_all = inner, stage_all
        self.rank, self.world, self.timeout_s = inner.rank, inner.world, inner.timeout_s
        self.pin = torch.cuda.is_available()

    def _staged(self, t: torch.Tensor) -> bool:
        return self.stage_all or t.device.type != "cpu"

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)

    def create_groups(self, groups):
        self.inner.create_groups(groups)

    def start_all_reduce(self, tensor, group):
        return _StagedWork(self.inner.start_all_reduce(tensor, group), None)

    def doing(self, action):
        self.inner.doing(action)

    def post(self, ops):
        staged, copies = [], []
        for send, t, peer, group in ops:
            if not self._staged(t):
                staged.append((send, t, peer, group))
                copies.append(None)
                continue
            h = self._host(t)
            if send:
                h.copy_(t)       # synchronous: the bytes are on the host before gloo reads them
            staged.append((send, h, peer, group))
            copies.append(None if send else (h, t))
        works = self.inner.post(staged)
        return [_StagedWork(w, c) for w, c in zip(works, copies)]

    def wait(self, work, peer, what):
        self.inner.wait(work.inner, peer, what)
        if work.copy is not None:
            host, dev = work.copy
            dev.copy_(host, non_blocking=True)
            work.copy = None

    def all_reduce(self, tensor, group, what):
        if not self._staged(tensor):
            return self.inner.all_reduce(tensor, group, what)
        h = self._host(tensor)
        h.copy_(tensor)
        self.inner.all_reduce(h, group, what)
        tensor.copy_(h, non_blocking=True)

    def all_gather_object(self, obj):
        return self.inner.all_gather_object(obj)

    def broadcast_object(self, obj, src=0):
        return self.inner.broadcast_object(obj, src)

    def barrier(self):
        self.inner.barrier()


class _StagedWork:
    def __init__(self, inner, copy):
        self.inner, self.copy = inner, copy


# ---- ranks as threads -----------------------------------------------------------------------
class LocalWorld:
    """The shared state of an in-memory world: message queues and collective rendezvous."""

    def __init__(self, world: int, timeout_s: float = 120.0):
        self.world, self.timeout_s = world, timeout_s
        self.cond = threading.Condition()
        self.sent: dict[tuple, list] = defaultdict(list)     # (group, src, dst) -> payloads
        self.rounds: dict[tuple, dict] = {}                 # (group, n) -> {rank: value}
        self.failed: str | None = None

    def fail(self, why: str) -> None:
        with self.cond:
            self.failed = why
            self.cond.notify_all()

    def wait_for(self, pred, rank: int, what: str):
        with self.cond:
            if not self.cond.wait_for(lambda: pred() or self.failed is not None,
                                      timeout=self.timeout_s):
                raise PipelineError(f"rank {rank}: timed out after {self.timeout_s:.0f}s "
                                    f"{what}")
            if self.failed is not None and not pred():
                raise PipelineError(f"rank {rank}: {what} failed: {self.failed}")

    def rendezvous(self, key: tuple, rank: int, members: tuple[int, ...], value, what: str):
        with self.cond:
            box = self.rounds.setdefault(key, {})
            box[rank] = value
            self.cond.notify_all()
        self.wait_for(lambda: len(self.rounds[key]) == len(members), rank, what)
        return [self.rounds[key][m] for m in members]


class _LocalWork:
    def __init__(self, fn=None):
        self.fn = fn

    def wait(self, timeout=None):
        if self.fn is not None:
            fn, self.fn = self.fn, None
            fn()


class LocalComm(Comm):
    def __init__(self, shared: LocalWorld, rank: int):
        self.w, self.rank, self.world = shared, rank, shared.world
        self.timeout_s = shared.timeout_s
        self.members: dict[str, tuple[int, ...]] = {"world": tuple(range(self.world))}
        self._recv_seq: dict[tuple, int] = defaultdict(int)
        self._rounds: dict[str, int] = defaultdict(int)

    def create_groups(self, groups):
        self.members.update(groups)

    def post(self, ops):
        works = []
        for send, t, peer, group in ops:
            if send:
                with self.w.cond:
                    self.w.sent[(group, self.rank, peer)].append(t.detach().clone())
                    self.w.cond.notify_all()
                works.append(_LocalWork())
            else:
                key = (group, peer, self.rank)
                n = self._recv_seq[key]
                self._recv_seq[key] += 1
                works.append(_LocalWork(lambda key=key, n=n, t=t, peer=peer: self._take(
                    key, n, t, peer)))
        return works

    def _take(self, key, n, t, peer):
        queue = self.w.sent[key]
        self.w.wait_for(lambda: len(queue) > n, self.rank, f"receiving from rank {peer}")
        got = queue[n]
        if got.shape != t.shape:
            raise PipelineError(f"rank {self.rank}: rank {peer} sent a tensor of shape "
                                f"{list(got.shape)} where {list(t.shape)} was expected; the "
                                f"ranks disagree on the schedule")
        t.copy_(got)
        queue[n] = None     # handed over: free it

    def wait(self, work, peer, what):
        work.wait()

    def _collective(self, group: str, value, what: str) -> list:
        n = self._rounds[group]
        self._rounds[group] += 1
        return self.w.rendezvous((group, n), self.rank, self.members[group], value, what)

    def all_reduce(self, tensor, group, what):
        parts = self._collective(group, tensor.detach().clone(), what)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        tensor.copy_(total)

    def start_all_reduce(self, tensor, group):
        n = self._rounds[group]
        self._rounds[group] += 1
        key, members = (group, n), self.members[group]
        with self.w.cond:
            self.w.rounds.setdefault(key, {})[self.rank] = tensor.detach().clone()
            self.w.cond.notify_all()

        def finish():
            self.w.wait_for(lambda: len(self.w.rounds[key]) == len(members), self.rank,
                            f"waiting for round {n} on {group}")
            total = sum(self.w.rounds[key][m] for m in members)
            tensor.copy_(total)
        return _LocalWork(finish)

    def all_gather_object(self, obj):
        return self._collective("world", obj, "exchanging results with every rank")

    def broadcast_object(self, obj, src=0):
        return self._collective("world", obj, f"receiving from rank {src}")[src]

    def barrier(self):
        self._collective("world", None, "waiting for every rank")

"""Carries out the schedule's point-to-point actions for one rank: buffers, posts, waits.

The schedule (engine/schedule.py) says which message to post or wait for and when; this module
owns the tensors. A compute action `put`s the tensors of the messages it produces; `post`
sends them, or receives into preallocated buffers; `wait` waits and, for a receive, makes the
tensors available to `take`.

Receive buffers for activations (and evaluation batches) are allocated once, as a ring of
2 x (batches in flight) slots: a rank holds at most that many batches it has received and not
finished (M unfinished, M received ahead), so a slot is never overwritten while a graph still
reads it; the schedule also waits for the send that forwards a batch's labels (and images)
before posting the receive that reuses its slot (tests/test_schedule.py checks both).
Activations travel in the compute dtype (bf16 runs send bf16). Sent tensors stay referenced
until their send is waited on. On CUDA, ProcessGroupNCCL runs each communicator on a stream
of its own and orders it against the compute stream with events; `wait` makes the compute
stream, not the host, wait.

Waits are timed on the host on CPU and with CUDA events on GPUs, where the host returns from
an NCCL wait at once and the stall happens on the stream: `StepClock` reads the events only
when metrics are logged, so timing adds no synchronisation to a step.
"""

from __future__ import annotations

import time

import torch

from pipemlaan.engine.comm import Comm
from pipemlaan.engine.schedule import EVAL, FWD, GRAD, LAM, Msg, Op
from pipemlaan.errors import PipelineError


PARTS = ("compute", "recv", "send", "data", "lam", "allreduce")


class StepClock:
    """Seconds a rank spent in each part of its steps since the last reset: computing
    ("compute"), waiting on its peers ("recv", "send"), waiting for its loader ("data": the
    first stage's next batch), LAM's EMA step and packing of weights ("lam"), and replica
    gradient and batch-norm all-reduces ("allreduce"). Spans nest: the all-reduces run inside a
    step's compute span, and an inner span's time counts for its own part and is taken out of
    the enclosing one, so no second is counted twice and a window's wall time is the parts'
    sum plus what no span covers (`parts`: "other")."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._host = dict.fromkeys(PARTS, 0.0)
        self._events: list[tuple[str, object, object, int]] = []
        self._open: list[str] = []        # parts of the spans open now, innermost last

    def measure(self, kind: str):
        return _Span(self, kind)

    def seconds(self, kind: str) -> float:
        if self.cuda and self._events:
            torch.cuda.synchronize()
            for k, a, b, sign in self._events:
                self._host[k] += sign * a.elapsed_time(b) / 1000.0
            self._events.clear()
        return self._host[kind]

    def parts(self, elapsed: float) -> dict[str, float]:
        """Seconds per part of a window of `elapsed` wall seconds, with "other" (what no span
        covered: the loop, logging, the stop rounds) so that they add up to `elapsed`. On CUDA
        the parts are device time from events, which may exceed the host's wall time when
        work queued in an earlier window runs in this one: "other" can then be negative."""
        out = {k: self.seconds(k) for k in PARTS}
        out["other"] = elapsed - sum(out.values())
        return out


class _Span:
    def __init__(self, clock: StepClock, kind: str):
        self.clock, self.kind = clock, kind

    def __enter__(self):
        if self.clock.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        self.clock._open.append(self.kind)
        return self

    def __exit__(self, *exc):
        clock = self.clock
        clock._open.pop()
        outer = clock._open[-1] if clock._open else None
        if clock.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            clock._events.append((self.kind, self.start, end, 1))
            if outer is not None:
                clock._events.append((outer, self.start, end, -1))
        else:
            d = time.perf_counter() - self.t0
            clock._host[self.kind] += d
            if outer is not None:
                clock._host[outer] -= d
        return False


class Transport:
    def __init__(self, comm: Comm, rank: int, device: torch.device, *, in_shape, out_shape,
                 image_shape, batch_size: int, grads_in: int, in_flight: int,
                 act_dtype: torch.dtype = torch.float32, has_prev: bool, has_next: bool,
                 eval_batch_size=None, clock: StepClock | None = None, lam_buffer=None):
        self.comm, self.rank, self.device = comm, rank, device
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.image_shape = tuple(image_shape) if image_shape else None
        self.batch_size, self.act_dtype = batch_size, act_dtype
        self.eval_batch_size = eval_batch_size or (lambda i: batch_size)
        self.clock = clock or StepClock(device)
        self._out: dict[Msg, list[torch.Tensor]] = {}     # produced, not yet sent
        self._works: dict[Op, tuple[list, list[torch.Tensor]]] = {}
        self._in: dict[Msg, list[torch.Tensor]] = {}      # received, not yet taken
        self._recv_buffers: dict[Msg, list[torch.Tensor]] = {}
        self._ring = 2 * in_flight
        self._slot = 0
        B = batch_size
        if has_prev:
            self._acts = [torch.empty((B, *self.in_shape), dtype=act_dtype, device=device)
                          for _ in range(self._ring)]
            self._labels = [torch.empty(B, dtype=torch.long, device=device)
                            for _ in range(self._ring)]
            self._images = ([torch.empty((B, *self.image_shape), device=device)
                             for _ in range(self._ring)] if self.image_shape else None)
        # one buffer: the schedule waits for and uses each gradient before it posts the next
        self._grads = (torch.empty((grads_in, B, *self.out_shape), dtype=act_dtype,
                                   device=device) if has_next and grads_in else None)
        self.lam_buffer = lam_buffer   # owner rank -> a fresh flat buffer (engine/lam.py)

    def buffer_bytes(self) -> int:
        """Bytes of the receive buffers allocated at start-up (activations, labels, images
        and window gradients; LAM snapshots are counted by engine/lam.py's owner)."""
        bufs = [*getattr(self, "_acts", []), *getattr(self, "_labels", []),
                *(getattr(self, "_images", None) or []),
                *([self._grads] if self._grads is not None else [])]
        return sum(t.numel() * t.element_size() for t in bufs)

    # ---- what compute hands over and takes ------------------------------------------------
    def put(self, msg: Msg, tensors: list[torch.Tensor]) -> None:
        self._out[msg] = tensors

    def put_forward(self, msg: Msg, act: torch.Tensor, labels: torch.Tensor,
                    images: torch.Tensor | None) -> None:
        tensors = [act.to(self.act_dtype).contiguous(), labels]
        if self.image_shape:
            tensors.append(images.contiguous())
        self.put(msg, tensors)

    def take(self, msg: Msg) -> list[torch.Tensor]:
        try:
            return self._in.pop(msg)
        except KeyError:
            raise PipelineError(f"rank {self.rank}: {msg} was used before it was received; "
                                f"the schedule is inconsistent") from None

    # ---- the schedule's actions ------------------------------------------------------------
    def post(self, ops: tuple[Op, ...]) -> None:
        flat, spans = [], []
        for op in ops:
            tensors = self._out.pop(op.msg) if op.send else self._recv_into(op.msg)
            if not op.send:
                self._recv_buffers[op.msg] = tensors
            spans.append((op, tensors, len(flat)))
            flat += [(op.send, t, op.peer, op.group) for t in tensors]
        works = self.comm.post(flat)
        for op, tensors, i in spans:
            self._works[op] = (works[i:i + len(tensors)], tensors)

    def wait(self, op: Op) -> None:
        works, tensors = self._works.pop(op)
        what = (f"sending {op.msg.kind} {op.msg.index} to rank {op.peer}" if op.send else
                f"receiving {op.msg.kind} {op.msg.index} from rank {op.peer}")
        with self.clock.measure("send" if op.send else "recv"):
            for w in works:
                self.comm.wait(w, op.peer, what)
        if not op.send:
            self._in[op.msg] = self._recv_buffers.pop(op.msg)

    def _recv_into(self, msg: Msg) -> list[torch.Tensor]:
        if msg.kind in (FWD, EVAL):
            slot = self._slot
            self._slot = (self._slot + 1) % self._ring
            B = self.batch_size if msg.kind == FWD else self.eval_batch_size(msg.index)
            out = [self._acts[slot][:B], self._labels[slot][:B]]
            if self._images is not None:
                out.append(self._images[slot][:B])
            return out
        if msg.kind == GRAD:
            return [self._grads]
        if msg.kind == LAM:
            return [self.lam_buffer(msg.src)]
        raise ValueError(msg.kind)

    # ---- start-up --------------------------------------------------------------------------
    def handshake(self, config_hash: int, prev: int | None, next: int | None,
                  group_prev: str | None, group_next: str | None) -> None:
        """Each rank tells the next what it will send; the next checks it against its own."""
        def describe(shape, has_image):
            return torch.tensor([config_hash & 0x7FFFFFFFFFFF, self.batch_size, int(has_image),
                                 len(shape), *shape, *([0] * (4 - len(shape)))],
                                device=self.device)
        if next is not None:
            mine = describe(self.out_shape, self.image_shape is not None)
            for w in self.comm.post([(True, mine, next, group_next)]):
                self.comm.wait(w, next, f"start-up handshake with rank {next}")
        if prev is not None:
            expected = describe(self.in_shape, self.image_shape is not None)
            got = torch.empty_like(expected)
            for w in self.comm.post([(False, got, prev, group_prev)]):
                self.comm.wait(w, prev, f"start-up handshake with rank {prev}")
            if int(got[0]) != int(expected[0]):
                raise PipelineError(f"rank {self.rank}: rank {prev} runs a different "
                                    f"configuration; start every rank with the same --config "
                                    f"and overrides")
            if not torch.equal(got, expected):
                raise PipelineError(
                    f"rank {self.rank}: rank {prev} will send activations of shape "
                    f"{got[4:4 + int(got[3])].tolist()} (batch {int(got[1])}) but this rank "
                    f"expects {list(self.in_shape)} (batch {self.batch_size}); the partition or "
                    f"model differs between ranks")

"""Point-to-point links between neighbouring pipeline ranks (gloo on CPU, NCCL on GPU).

Two streams per neighbour pair, each in one direction and in a fixed order on both ends:
- forward (stage s -> s+1 of the same replica): a header [kind, step, batch] then the boundary
  activation, the labels and (InfoPro only) the images, for every training or evaluation batch;
- window gradients (stage s+1 -> s): the gradients of the windows that go on past stage s+1's
  first module, stacked in increasing window index, once per training batch.

Receive buffers are allocated once, at start-up, as a ring of `microbatches + 1` slots: a rank
never holds more than `microbatches` unfinished batches, so a slot is never overwritten while a
graph still reads it. Sent tensors are kept referenced until their send is waited on, and
sends are waited on late (at most `microbatches` steps behind), so a send never blocks compute.
Every wait has a timeout; a peer that died or went silent raises PipelineError naming it.
Start-up exchanges the expected shapes and a config hash, so a mismatch raises a named error
instead of hanging or silently mixing configurations.
"""

from __future__ import annotations

import time
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from pipemlaan.engine.watchdog import peer_failure
from pipemlaan.errors import PipelineError

TRAIN, EVAL = 0, 1


class Timer:
    """Accumulates seconds spent waiting on receives and on sends."""

    def __init__(self) -> None:
        self.recv_wait = 0.0
        self.send_wait = 0.0

    def reset(self) -> None:
        self.recv_wait = self.send_wait = 0.0


class Links:
    def __init__(self, rank: int, prev: int | None, next: int | None, device: torch.device, *,
                 in_shape, out_shape,
                 image_shape, batch_size: int, grads_in: int, grads_out: int, ring: int,
                 timeout_s: float, act_dtype: torch.dtype = torch.float32):
        self.rank, self.device = rank, device
        self.prev, self.next = prev, next     # neighbouring stages' global ranks (or None)
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.image_shape = tuple(image_shape) if image_shape else None
        self.batch_size = batch_size
        self.grads_in, self.grads_out = grads_in, grads_out
        self.timeout = timedelta(seconds=timeout_s)
        self.timer = Timer()
        self.act_dtype = act_dtype
        self._sends: deque[tuple[int, list]] = deque()
        self._ring = ring
        self._slot = 0
        B = batch_size
        if self.prev is not None:
            self._acts = [torch.empty((B, *self.in_shape), dtype=act_dtype, device=device)
                          for _ in range(ring)]
            self._labels = [torch.empty(B, dtype=torch.long, device=device) for _ in range(ring)]
            self._images = ([torch.empty((B, *self.image_shape), device=device)
                             for _ in range(ring)] if self.image_shape else None)
        if self.next is not None and grads_in:
            self._grads = torch.empty((grads_in, B, *self.out_shape), dtype=act_dtype,
                                      device=device)
        self._header = torch.empty(3, dtype=torch.long, device=device)

    # ---- waiting -------------------------------------------------------------------------
    def _wait(self, work, peer: int, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            raise peer_failure(self.rank, what + f" with rank {peer}", peer, e,
                               self.timeout.total_seconds()) from e

    def _recv(self, tensor: torch.Tensor, peer: int, what: str) -> None:
        t0 = time.perf_counter()
        self._wait(dist.irecv(tensor, peer), peer, f"receiving {what}")
        self.timer.recv_wait += time.perf_counter() - t0

    def _send(self, step: int, tensors: list[torch.Tensor], peer: int) -> None:
        try:
            works = [(dist.isend(t, peer), t) for t in tensors]
        except RuntimeError as e:
            raise peer_failure(self.rank, f"sending to rank {peer}", peer, e) from e
        self._sends.append((step, works))
        self.reap(step - self._ring + 1)

    def reap(self, upto_step: int | None = None) -> None:
        """Waits for sends issued at steps <= upto_step (all sends when None)."""
        t0 = time.perf_counter()
        while self._sends and (upto_step is None or self._sends[0][0] <= upto_step):
            _, works = self._sends.popleft()
            for work, _tensor in works:
                self._wait(work, self.next if self.next is not None else self.prev, "sending")
        self.timer.send_wait += time.perf_counter() - t0

    # ---- start-up ------------------------------------------------------------------------
    def handshake(self, config_hash: int) -> None:
        """Each rank tells the next what it will send; the next checks it against its own."""
        def describe(shape, has_image):
            return torch.tensor([config_hash & 0x7FFFFFFFFFFF, self.batch_size, int(has_image),
                                 len(shape), *shape, *([0] * (4 - len(shape)))], device=self.device)
        mine = describe(self.out_shape, self.image_shape is not None)
        if self.next is not None:
            self._wait(dist.isend(mine, self.next), self.next, "start-up handshake")
        if self.prev is not None:
            expected = describe(self.in_shape, self.image_shape is not None)
            got = torch.empty_like(expected)
            self._wait(dist.irecv(got, self.prev), self.prev, "start-up handshake")
            if int(got[0]) != int(expected[0]):
                raise PipelineError(f"rank {self.rank}: rank {self.prev} runs a different "
                                    f"configuration; start every rank with the same --config "
                                    f"and overrides")
            if not torch.equal(got, expected):
                raise PipelineError(
                    f"rank {self.rank}: rank {self.prev} will send activations of shape "
                    f"{got[4:4 + int(got[3])].tolist()} (batch {int(got[1])}) but this rank "
                    f"expects {list(self.in_shape)} (batch {self.batch_size}); the partition or "
                    f"model differs between ranks")

    # ---- forward stream ------------------------------------------------------------------
    def send_forward(self, kind: int, step: int, act: torch.Tensor, labels: torch.Tensor,
                     images: torch.Tensor | None) -> None:
        header = torch.tensor([kind, step, act.shape[0]], device=self.device)
        tensors = [header, act.to(self.act_dtype).contiguous(), labels]
        if self.image_shape:
            tensors.append(images.contiguous())
        self._send(step, tensors, self.next)

    def recv_forward(self, kind: int, step: int):
        self._recv(self._header, self.prev, "the batch header")
        got_kind, got_step, B = (int(v) for v in self._header.tolist())
        if (got_kind, got_step) != (kind, step) or B > self.batch_size:
            raise PipelineError(
                f"rank {self.rank}: expected {'train' if kind == TRAIN else 'eval'} batch "
                f"{step} from rank {self.prev} but got kind {got_kind} batch {got_step} "
                f"(size {B}); the ranks disagree on the schedule (different configs?)")
        slot = self._slot
        self._slot = (self._slot + 1) % self._ring
        act, labels = self._acts[slot][:B], self._labels[slot][:B]
        self._recv(act, self.prev, "activations")
        self._recv(labels, self.prev, "labels")
        images = None
        if self._images is not None:
            images = self._images[slot][:B]
            self._recv(images, self.prev, "images")
        return act, labels, images

    # ---- gradient stream -----------------------------------------------------------------
    def send_grads(self, step: int, grads: list[torch.Tensor]) -> None:
        if grads:
            self._send(step, [torch.stack(grads).to(self.act_dtype)], self.prev)

    def recv_grads(self) -> list[torch.Tensor]:
        if not self.grads_in:
            return []
        self._recv(self._grads, self.next, "window gradients")
        return list(self._grads.unbind(0))

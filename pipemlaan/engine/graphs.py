"""CUDA graphs: a single-process training step recorded once and replayed.

A DGL+MLAAN step of ResNet-110 (K=55) launches about 16,000 small kernels from Python; in bf16
the GPU finishes them faster than Python issues them. `GraphedStep` records the whole step
(every module's forward, its heads' backward and optimizer steps, the window backward passes,
the body updates: engine/stage.py's `train_step`) into one CUDA graph and then replays it with
one launch per step. The step reads its inputs from static buffers, its learning rates and step
number from device tensors (updates.py [Note: device scalars]), and updates the parameters,
momentum buffers, batch-norm statistics and non-finite counters in place, so a replay does
exactly what an eager step does.

When it applies (`graph_skip_reason`): train.cuda_graphs on, a CUDA device, one stage owning
every module, no replicas, no emulated pipeline. Pipeline ranks run eagerly: their steps are
cut by communication and, in async mode, hold graphs across steps. What stays eager in a graphed
run: the first `WARMUP` steps (on a side stream, as CUDA requires before a capture), any step
whose batch has another shape, evaluation, LAM/EMA updates and everything at logging steps. A
capture that fails falls back to eager steps for the rest of the run, with one line saying so.
"""

from __future__ import annotations

import torch

from pipemlaan.ui import console

WARMUP = 3      # eager steps before the capture (cuDNN/cuBLAS handles, lazy state, the allocator)


def graph_skip_reason(cfg, setup) -> str | None:
    """Why this rank's steps are not captured, or None when they are."""
    if not cfg.train.cuda_graphs:
        return "train.cuda_graphs=false"
    if setup.env.device.type != "cuda":
        return "not on CUDA"
    if setup.placement.stages > 1:
        return "pipeline ranks run eagerly"
    if setup.placement.replicas > 1:
        return "replicas run eagerly"
    if cfg.pipeline.emulate_async:
        return "pipeline.emulate_async runs eagerly"
    if setup.tracker is not None and setup.tracker.always:
        return "the saved-tensor tracker is on for every step"
    return None


class GraphedStep:
    """Drop-in for `stage.train_step` on a single-process CUDA run."""

    def __init__(self, stage):
        self.stage = stage
        stage.use_device_scalars()
        self.eager_steps = 0
        self.replays = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None
        self._static: tuple | None = None
        self._result = None
        self._losses: dict = {}
        self._side = torch.cuda.Stream(device=stage.device)

    def __call__(self, step: int, lr: float, x: torch.Tensor, labels: torch.Tensor,
                 images: torch.Tensor | None):
        stage = self.stage
        stage.set_scalars(step, lr)
        if self.graph is not None and self._fits(x, labels, images):
            for buf, new in zip(self._static, (x, labels, images)):
                if buf is not None:
                    buf.copy_(new)
            self.graph.replay()
            self.replays += 1
            stage.losses = dict(self._losses)
            return self._result
        if self.graph is None and self.failed is None:
            if self.eager_steps < WARMUP:
                self.eager_steps += 1
                return self._on_side_stream(step, lr, x, labels, images)
            captured = self._capture(step, lr, x, labels, images)
            if captured is not None:
                return captured
        self.eager_steps += 1       # another shape, or no graph: this step runs eagerly
        return stage.train_step(step, lr, x, labels, images)

    def _fits(self, x, labels, images) -> bool:
        return all((buf is None and new is None) or
                   (buf is not None and new is not None and buf.shape == new.shape
                    and buf.dtype == new.dtype)
                   for buf, new in zip(self._static, (x, labels, images)))

    def _on_side_stream(self, step, lr, x, labels, images):
        main = torch.cuda.current_stream(self.stage.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            result = self.stage.train_step(step, lr, x, labels, images)
        main.wait_stream(self._side)
        return result

    def _capture(self, step, lr, x, labels, images):
        """Records step `step` (nothing runs during a capture) and replays it once."""
        stage = self.stage
        self._static = tuple(None if t is None else t.clone() for t in (x, labels, images))
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a data or watchdog thread's CUDA calls must not void the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._result = stage.train_step(step, lr, *self._static)
        except Exception as e:      # noqa: BLE001 - any capture failure: run eagerly instead
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            console.print(f"[yellow]CUDA graph capture failed ({self.failed}); training goes "
                          f"on eagerly (set train.cuda_graphs=false to skip the attempt)")
            self._forget_capture()
            return None
        self.graph = graph
        self._losses = dict(stage.losses)
        graph.replay()
        self.replays = 1
        return self._result

    def _forget_capture(self) -> None:
        """Undoes what a failed capture left on the host: nothing of it ran on the device."""
        self.stage.discard_step()
        self._static = self._result = None

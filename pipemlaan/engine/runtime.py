"""What a rank asks of torch before it builds anything: CPU threads, deterministic algorithms,
cuDNN's algorithm search (train.threads, train.deterministic, train.cudnn_benchmark).

Called once per process at start-up, before the first kernel (engine/distributed.py
`init_distributed`); cuBLAS reads its workspace setting at its first use.
"""

from __future__ import annotations

import os

import torch

from pipemlaan.config import TrainConfig


def configure_torch(t: TrainConfig) -> None:
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few ops the heads use (adaptive pooling's CUDA backward) have no
        # deterministic kernel; they warn instead of stopping the run, and differ only by
        # the order of floating-point atomics
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = t.cudnn_benchmark

"""Replica batch norm (engine/replicas.py): two replicas, each with half of a batch, give the
statistics, outputs, gradients and running buffers of one batch norm over the whole batch,
for BatchNorm2d (the backbone) and BatchNorm1d (the reference DGL* head's linear layers), to
float32 rounding (the replica version computes its statistics in float32).

Run: .venv/bin/python -m pytest tests/test_replica_batch_norm.py -q
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from pipemlaan.engine.comm import LocalComm, LocalWorld
from pipemlaan.engine.replicas import GradSync, sync_batch_norm


@pytest.mark.parametrize("shape", [(16, 6, 5, 5), (16, 12)], ids=["2d", "1d"])
def test_two_replicas_equal_one_batch_norm_over_the_whole_batch(shape):
    torch.manual_seed(0)
    kind = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    ref = kind(shape[1])
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    x = torch.randn(*shape, dtype=torch.float32) * 3 + 1
    w = torch.randn(*shape, dtype=torch.float32)         # a loss that weighs every output
    xr = x.clone().requires_grad_(True)
    (ref(xr) * w).sum().backward()

    world = LocalWorld(2)
    out: list = [None, None]

    def replica(r: int) -> None:
        comm = LocalComm(world, r)
        comm.create_groups({"stage:0": (0, 1)})
        bn = copy.deepcopy(ref)
        bn.zero_grad(set_to_none=True)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.num_batches_tracked.zero_()
        assert sync_batch_norm(bn, GradSync(comm, "stage:0", 2)) == 1
        half = slice(r * shape[0] // 2, (r + 1) * shape[0] // 2)
        xs = x[half].clone().requires_grad_(True)
        y = bn(xs)
        (y * w[half]).sum().backward()
        out[r] = (y.detach(), xs.grad, bn.weight.grad, bn.bias.grad, bn.running_mean.clone(),
                  bn.running_var.clone())

    threads = [threading.Thread(target=replica, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(o is not None for o in out)
    whole = kind(shape[1])
    whole.load_state_dict({**ref.state_dict(), "running_mean": torch.zeros(shape[1]),
                           "running_var": torch.ones(shape[1]),
                           "num_batches_tracked": torch.tensor(0)})
    want_y = whole(x).detach()
    y = torch.cat([out[0][0], out[1][0]])
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]), xr.grad, rtol=1e-5,
                               atol=1e-6)
    # each replica's parameter gradient is its share; their sum is the whole batch's
    torch.testing.assert_close(out[0][2] + out[1][2], ref.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][3] + out[1][3], ref.bias.grad, rtol=1e-5, atol=1e-6)
    for r in range(2):
        torch.testing.assert_close(out[r][4], whole.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[r][5], whole.running_var, rtol=1e-5, atol=1e-6)

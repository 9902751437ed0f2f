"""A training step never waits for the device: no host-device synchronisation outside logging
steps, and a fixed number of fused optimizer launches per step.

Counts, with a TorchDispatchMode around each step's actions (ranks are threads here, and
dispatch modes are per thread), the operations that make the host wait for the device
(`aten._local_scalar_dense` behind .item()/float()/bool(), `aten.is_nonzero`, `aten.equal`)
and the fused SGD launches. On CPU nothing actually waits, but the same code on CUDA would:
this is the check that a step stays free of them (issue: a GPU-bound local-learning step).
Also: a planted NaN is skipped on the device and reported at the next logging step, in both
train.nonfinite modes.

Run: cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_no_host_sync.py -q
"""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipemlaan.engine.schedule import Compute
from pipemlaan.engine.trainer import Trainer
from pipemlaan.errors import PipemlaanError

from inprocess import run_ranks

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
TINY = ["--data.name=synthetic", "--data.synthetic_image=[3,8,8]", "--model.name=resnet8",
        "--model.K=4", "--method.first_modules_head=true", "--method.heads=compact",
        "--train.batch_size=16", "--run.progress=false", "--run.log_every=4",
        "--train.device=cpu", "--data.synthetic_size=128", "--train.epochs=1",
        "--method.name=dgl", "--method.mlm=true", "--method.lam=true", "--run.overwrite=true"]


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.fused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            self.syncs.append(str(func))
        if func.overloadpacket in (aten._fused_sgd_, aten._fused_sgd):
            self.fused += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted(monkeypatch):
    """Per (rank, step): the syncs and fused optimizer launches of that step's actions."""
    seen: dict = defaultdict(lambda: {"syncs": [], "fused": 0})
    lock = threading.Lock()
    original = Trainer._run

    def run(self, actions):
        actions = list(actions)
        steps = [a.index for a in actions if isinstance(a, Compute) and a.name == "step"]
        if not steps:
            return original(self, actions)
        with Counter() as c:
            original(self, actions)
        with lock:
            entry = seen[(self.env.rank, steps[0])]
            entry["syncs"] += c.syncs
            entry["fused"] += c.fused
    monkeypatch.setattr(Trainer, "_run", run)
    return seen


@pytest.mark.parametrize("world,extra", [(1, []), (2, ["--pipeline.mode=lockstep"]),
                                         (2, ["--pipeline.mode=async", "--pipeline.replicas=2"]),
                                         (4, ["--pipeline.mode=async"])])
def test_training_steps_never_synchronise_with_the_device(tmp_path, counted, world, extra):
    run_ranks(TINY + extra + [f"--run.dir={tmp_path}", f"--run.name=w{world}"], world)
    assert counted, "no step was counted"
    bad = {key: sorted(set(v["syncs"])) + [len(v["syncs"])] for key, v in counted.items()
           if v["syncs"]}
    assert not bad, f"host-device synchronisations inside steps (rank, step): {bad}"


def test_one_fused_optimizer_launch_per_parameter_group_per_step(tmp_path, counted):
    """Each module steps its heads, then its body, each as one fused kernel per parameter
    group (body; g; h: they may have their own lr multipliers), where before every step() of
    a module ran several kernels per group. Here 10 launches a step for 4 modules."""
    from pipemlaan.config import load_config
    from pipemlaan.data import dataset_spec
    from pipemlaan.local.module import build_local_modules
    cfg = load_config(None, TINY)
    _, mods = build_local_modules(cfg, dataset_spec(cfg.data))
    groups = sum(len(m.param_groups(cfg)) for m in mods)
    run_ranks(TINY + ["--pipeline.mode=lockstep", f"--run.dir={tmp_path}", "--run.name=opt"], 1)
    launches = {step: v["fused"] for (rank, step), v in counted.items()}
    assert groups == 10 and set(launches.values()) == {groups}, launches


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_planted_nan_is_skipped_on_the_device_and_reported(tmp_path, monkeypatch, mode):
    """A NaN planted in module 1's loss at step 5: that module's update is skipped (no weight
    turns non-finite); stop mode ends the run at the next logging step (8) naming module 1
    and step 5; skip mode finishes and counts the skipped update."""
    from pipemlaan.engine import updates as updates_mod
    original = updates_mod.Updates._guarded_step

    def planted(self, k, params, finite, lr, step):
        if k == 1 and step == 5 and params is self.head_params[k]:
            finite = finite & torch.tensor(False)
        return original(self, k, params, finite, lr, step)
    monkeypatch.setattr(updates_mod.Updates, "_guarded_step", planted)
    args = TINY + [f"--train.nonfinite={mode}", f"--run.dir={tmp_path}", "--run.name=nan"]
    if mode == "stop":
        with pytest.raises(PipemlaanError, match=r"rank 0: module 1 .* at step 5"):
            run_ranks(args, 1)
        ckpts = list((tmp_path / "nan").glob("checkpoints/step_*"))
        assert not ckpts, "a checkpoint was written after the non-finite step"
    else:
        res = run_ranks(args, 1)
        assert res["summary"]["steps"] == 8
        for p in (tmp_path / "nan" / "checkpoints").rglob("module_*.pt"):
            state = torch.load(p, weights_only=True)["module"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


class _ScalarsOnCpu:
    """What engine/graphs.py's GraphedStep does around each step, less the capture (CPU has no
    CUDA graphs; tests/test_gpu.py replays real ones): learning rates and step number read from
    device tensors that are written before the step."""

    def __init__(self, stage):
        self.stage, self.replays, self.eager_steps, self.failed = stage, 0, 0, None
        stage.use_device_scalars()

    def __call__(self, step, lr, x, labels, images):
        self.stage.set_scalars(step, lr)
        self.eager_steps += 1
        return self.stage.train_step(step, lr, x, labels, images)


def test_device_scalars_give_the_same_run_bit_for_bit(tmp_path, monkeypatch):
    """The graph mode's lr and step tensors ([Note: device scalars]) change nothing: with a
    warm-up schedule (a new lr every step), lr multipliers on every group and a planted NaN at
    step 5 (found through the step tensor), the run equals the plain one bit for bit."""
    from pipemlaan.engine import updates as updates_mod
    from pipemlaan.engine import trainer as trainer_mod
    original = updates_mod.Updates._guarded_step

    def planted(self, k, params, finite, lr, step):
        at = step if self._step_dev is None else self._step_dev     # the graph's step
        if k == 2 and params is self.body_params[k]:
            finite = finite & (torch.as_tensor(at) != 5)
        return original(self, k, params, finite, lr, step)
    monkeypatch.setattr(updates_mod.Updates, "_guarded_step", planted)
    args = TINY + ["--train.nonfinite=skip", "--train.warmup_epochs=1",
                   "--train.lr_mult_backbone=0.7", "--train.lr_mult_g=1.3",
                   "--train.lr_mult_h=0.9", f"--run.dir={tmp_path}"]
    plain = run_ranks(args + ["--run.name=plain"], 1)["summary"]
    monkeypatch.setattr(trainer_mod, "graph_skip_reason", lambda cfg, s: None)
    monkeypatch.setattr(trainer_mod, "GraphedStep", _ScalarsOnCpu)
    scalars = run_ranks(args + ["--run.name=scalars"], 1)["summary"]
    assert scalars["cuda_graph"] == {"replayed_steps": 0, "eager_steps": 8, "off": None}
    assert plain["cuda_graph"]["off"] == "not on CUDA"
    assert scalars["param_checksum"] == plain["param_checksum"]
    assert scalars["final_train_loss_per_module"] == plain["final_train_loss_per_module"]
    assert scalars["per_module_test_error"] == plain["per_module_test_error"]
    assert scalars["skipped_updates"] == plain["skipped_updates"] == {"2": 1}, plain

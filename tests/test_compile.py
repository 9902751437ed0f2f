"""train.compile (engine/compiled.py) on CPU: inductor-compiled steps equal eager ones, a
compilation that fails (forward or backward) leaves the stage eager with one line saying why,
and what each setting means where.

The equality test compiles with inductor's C++ backend: about 50 s the first time on a busy
2-core machine (gcc builds each kernel), under 10 s once inductor's cache holds the kernels.
It skips, naming the reason, only where inductor cannot compile for the CPU (no C++ compiler).
The GPU's version, with the CUDA graph on top, is in tests/test_gpu.py.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_compile.py -q
"""

from __future__ import annotations

import pytest
import torch

from pipemlaan.config import load_config
from pipemlaan.data import DatasetSpec
from pipemlaan.engine.compiled import (CompiledModules, compile_skip_reason,
                                       inductor_unavailable)
from pipemlaan.engine.stage import Stage
from pipemlaan.errors import ConfigError
from pipemlaan.local.module import build_local_modules, window_plan

CPU = torch.device("cpu")
SPEC = DatasetSpec("synthetic", 3, (8, 8), 10, (0.0,) * 3, (1.0,) * 3)
# the smallest run with a window that reaches back across a module boundary: module 1's
# window gradient is pulled back through its body (retain_graph) and then its body is
# back-propagated, the compiled backward running twice on one graph
FLAGS = ["--model.name=resnet8", "--model.K=2", "--method.name=dgl", "--method.mlm=true",
         "--method.lam=true", "--train.batch_size=8"]


def _run(mode: str, steps: int = 2, backend=None, first: int = 0) -> dict:
    """`steps` steps of a stage owning modules `first`.. (first=1: the last rank of a 2-rank
    pipeline, which hands window gradients back to the rank before it)."""
    torch.manual_seed(0)
    cfg = load_config(None, [*FLAGS, f"--train.compile={mode}"])
    _, mods = build_local_modules(cfg, SPEC)
    stage = Stage(cfg, mods[first:], window_plan(cfg, len(mods)), CPU)
    if backend is not None:
        stage.compiled = CompiledModules(mods[first:], backend=backend)
    g = torch.Generator().manual_seed(1)
    losses, upstream = [], []
    for step in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        if first:
            with torch.no_grad():
                x = mods[0].body(x)
        _, up = stage.train_step(step, 0.1, x, y, None)
        losses.append({k: float(v) for k, v in stage.losses.items()})
        upstream += up
    state = {f"{m.index}.{n}": t.detach().clone() for m in mods[first:]
             for n, t in [*m.named_parameters(), *m.named_buffers()]}
    return {"losses": losses, "state": state, "stage": stage, "upstream": upstream}


def _assert_close(ref: dict, got: dict, rtol: float, atol: float) -> None:
    assert len(ref["losses"]) == len(got["losses"])
    for a, b in zip(ref["losses"], got["losses"]):
        assert a.keys() == b.keys() and a
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=rtol), k
    assert ref["state"].keys() == got["state"].keys()
    for name, a in ref["state"].items():
        torch.testing.assert_close(got["state"][name], a, rtol=rtol, atol=atol, msg=name)


def test_compiled_steps_equal_eager_steps_on_cpu():
    why = inductor_unavailable(CPU)
    if why is not None:
        pytest.skip(f"inductor cannot compile for this CPU: {why}")
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    eager = _run("off")
    compiled = _run("on")
    report = compiled["stage"].compiled.report()
    assert report == {"compiled_modules": 3, "off": None}       # module 0's body, module 1's
    assert counters["stats"]["unique_graphs"] > graphs          # body and classifier head
    _assert_close(eager, compiled, rtol=1e-4, atol=1e-6)


def test_a_compiled_pipeline_rank_hands_back_what_eager_does():
    """The last rank of a 2-rank pipeline: the window gradients it sends back agree with
    eager ones and are contiguous, as gloo needs them (inductor's channels-last layouts are
    off on CPU for that reason)."""
    why = inductor_unavailable(CPU)
    if why is not None:
        pytest.skip(f"inductor cannot compile for this CPU: {why}")
    eager, compiled = _run("off", first=1), _run("on", first=1)
    assert compiled["stage"].compiled.report() == {"compiled_modules": 2, "off": None}
    _assert_close(eager, compiled, rtol=1e-4, atol=1e-6)
    assert len(compiled["upstream"]) == 2
    for a, b in zip(eager["upstream"], compiled["upstream"]):
        assert b.is_contiguous()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def _failing_backward_backend():
    """A backend whose forward compiles and whose backward does not."""
    from torch._dynamo.backends.common import aot_autograd

    def refuse(gm, example_inputs):
        raise RuntimeError("this backend has no backward")
    return aot_autograd(fw_compiler=lambda gm, example_inputs: gm, bw_compiler=refuse)


def test_a_failed_compilation_goes_on_eagerly_with_one_line(capsys):
    """The backward is compiled with its forward, so its failure too surfaces before anything
    of the module ran: the steps are then exactly the eager ones."""
    eager = _run("off")
    fell_back = _run("off", backend=_failing_backward_backend())
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "torch.compile failed" in line]
    assert lines == ["torch.compile failed (RuntimeError: this backend has no backward); this "
                     "rank goes on eagerly (set train.compile=off to skip the attempt)"], out
    assert fell_back["stage"].compiled.report() == {
        "compiled_modules": 0, "off": "RuntimeError: this backend has no backward"}
    _assert_close(eager, fell_back, rtol=0, atol=0)


def test_compile_setting_values_and_where_they_apply():
    assert load_config(None, ["--train.compile=auto"]).train.compile == "auto"
    assert load_config(None, []).train.compile == "off"
    with pytest.raises(ConfigError, match=r"train.compile='yes' is unknown; use one of off, "
                                          r"on, auto"):
        load_config(None, ["--train.compile=yes"])
    assert compile_skip_reason("off", CPU) == "train.compile=off"
    assert compile_skip_reason("auto", CPU) == "train.compile=auto is off on CPU"
    assert compile_skip_reason("on", CPU) == inductor_unavailable(CPU)
    cuda = torch.device("cuda")
    assert compile_skip_reason("auto", cuda) == inductor_unavailable(cuda)


def test_replica_batch_norm_keeps_the_stage_eager(capsys):
    """pipeline.sync_bn's batch norm all-reduces inside the forward: not for dynamo."""
    from pipemlaan.engine.compiled import compile_modules
    from pipemlaan.engine.replicas import sync_batch_norm
    cfg = load_config(None, [*FLAGS, "--train.compile=on"])
    _, mods = build_local_modules(cfg, SPEC)
    for m in mods:
        sync_batch_norm(m, sync=object())
    assert compile_modules(cfg, mods, CPU) is None
    assert "train.compile=on: pipeline.sync_bn's batch norm all-reduces inside the forward; " \
           "this rank runs eagerly" in capsys.readouterr().out

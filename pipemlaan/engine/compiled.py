"""torch.compile (inductor) of each local module's step work, with eager as the fallback.

`train.compile` (off | on | auto) compiles, per local module, the body's forward and each
head's forward with its loss; AOTAutograd compiles the matching backward passes. Inductor fuses
what the GPU profile spends most of its kernel time on outside the convolutions: batch norm
(training statistics + normalisation), ReLU, the residual add, pooling and the loss's
elementwise tail. What stays as it was: engine/stage.py's step order (the gradient sums, the
window hand-over, the fused SGD steps with their device-side skip), so a compiled step does the
same work in the same order as an eager one, with kernels that differ only in their rounding.

It composes with the CUDA graph of a single-process run (engine/graphs.py): the graph's eager
warm-up steps compile every module (each backward together with its forward: see `_errors`),
and the capture then records inductor's kernels like any others, one replay per step. Pipeline
ranks and replicas, which run without a graph, call the compiled code directly; a stage with
pipeline.sync_bn stays eager (its batch norm all-reduces inside the forward).

`auto` is on for CUDA ranks when inductor can generate GPU kernels (triton installed), single
process and pipeline ranks alike; off on CPU, where compiling costs more than a CPU step saves
and needs a C++ compiler. `on` compiles on CPU too (what tests/test_compile.py checks).

A module whose compilation fails (dynamo cannot trace it, inductor cannot lower it, no C++
compiler, ...) is called eagerly; so is every other module of the stage from then on, with
one line saying why: a run never stops because compiling did not work, and never mixes the two.
Shapes are static (`dynamic=False`): each shape (training batch, evaluation batch, the last
smaller batch) gets kernels of its own. Compiled kernels are cached across runs in a folder of
pipemlaan's own under inductor's (`_own_cache` says why).

  python -m pipemlaan.train --train.compile=on ...     (or auto: on for CUDA ranks)
"""

from __future__ import annotations

import os
import shutil

import torch
from rich.markup import escape

from pipemlaan.engine.replicas import _ReplicaStats
from pipemlaan.ui import console

# every module's body and heads enter dynamo through nn.Module._call_impl, one code object,
# so all of a stage's graphs (bodies and heads of every shape, training and evaluation) share
# one cache: the default limit (8) would leave most of them uncompiled (ResNet-110 K=55
# DGL+MLAAN has 14 distinct training graphs and 11 evaluation ones)
RECOMPILE_LIMIT = 512


def inductor_unavailable(device: torch.device) -> str | None:
    """Why inductor cannot compile for `device` here, or None when it can."""
    try:
        import torch._inductor  # noqa: F401
    except Exception as e:      # noqa: BLE001 - any import failure means no inductor
        return f"torch._inductor does not import ({type(e).__name__})"
    if device.type == "cuda":
        from torch.utils._triton import has_triton, has_triton_package
        if not has_triton_package():
            return "triton is not installed (inductor's GPU kernels need it)"
        if not has_triton():
            return "triton does not support this GPU"
        return None
    from torch._inductor import config as ind
    cxx = ind.cpp.cxx[-1] if isinstance(ind.cpp.cxx, tuple) else ind.cpp.cxx
    if not any(shutil.which(c) for c in (cxx, "g++", "clang++") if c):
        return "no C++ compiler on PATH (inductor's CPU kernels need one)"
    return None


def compile_skip_reason(setting: str, device: torch.device) -> str | None:
    """Why a stage on `device` runs eagerly under train.compile=`setting`, or None."""
    if setting == "off":
        return "train.compile=off"
    if setting == "auto" and device.type != "cuda":
        return "train.compile=auto is off on CPU"
    return inductor_unavailable(device)


def _errors() -> tuple[type[BaseException], ...]:
    """What a failed compilation raises. Backward passes are compiled together with their
    forward (`force_non_lazy_backward_lowering`), so a backward that cannot compile also fails
    here, before anything ran, instead of in the middle of a step's backward."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler
    return (TorchDynamoException, CppCompileError, InvalidCxxCompiler)


def _setting(config, name: str, value) -> None:
    if hasattr(config, name):
        setattr(config, name, value)


def _own_cache() -> None:
    """Inductor's FX graph cache keys a backward graph without the buffers AOTAutograd donated
    to it (torch 2.14): a graph compiled elsewhere with donation, torch's default, would be
    reused here, where a window's backward runs it twice (retain_graph), and give wrong
    gradients without a word. Found on this project's modules: an entry left by a default
    compile made the compiled step drift from the eager one. pipemlaan's compilations therefore
    keep a cache folder of their own, which holds only graphs compiled without donation
    (TORCHINDUCTOR_CACHE_DIR, when set to anything but the default, is left alone)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return
    default = os.path.abspath(default_cache_dir())
    if os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR", default)) == default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default, "pipemlaan")


class CompiledModules:
    """The compiled bodies and heads of one stage's modules. `failed` says why the stage went
    back to eager mode, or is None."""

    def __init__(self, modules, backend="inductor", mode: str | None = None,
                 options: dict | None = None):
        import torch._dynamo
        import torch._functorch.config
        dyn, aot = torch._dynamo.config, torch._functorch.config
        # (names of torch 2.14; an older torch that lacks one goes without it)
        _setting(dyn, "recompile_limit", max(getattr(dyn, "recompile_limit", 0),
                                             RECOMPILE_LIMIT))
        _setting(dyn, "accumulated_recompile_limit",
                 max(getattr(dyn, "accumulated_recompile_limit", 0), 4 * RECOMPILE_LIMIT))
        _setting(aot, "force_non_lazy_backward_lowering", True)
        # a window's gradient is pulled back through the body with retain_graph (stage.py,
        # step 3), which buffers donated to the backward would forbid
        _setting(aot, "donated_buffer", False)
        _own_cache()
        self.failed: str | None = None
        self._errors = _errors()
        self.parts = [part for m in modules for part in (m.body, m.g, m.h) if part is not None]
        for part in self.parts:
            self._wrap(part, torch.compile(part._call_impl, backend=backend, mode=mode,
                                           options=options, dynamic=False))

    def _wrap(self, part: torch.nn.Module, compiled) -> None:
        # nn.Module.__call__ takes this path, as after nn.Module.compile(): the module, its
        # parameter names and its state dict stay as they were (checkpoints do not change)
        def call(*args, **kwargs):
            if self.failed is None:
                try:
                    return compiled(*args, **kwargs)
                except self._errors as e:
                    self._give_up(e)
            return part._call_impl(*args, **kwargs)
        part._compiled_call_impl = call

    def _give_up(self, e: BaseException) -> None:
        # dynamo wraps what the backend raised: name that, not the wrapper
        while getattr(e, "inner_exception", None) is not None or e.__cause__ is not None:
            e = getattr(e, "inner_exception", None) or e.__cause__
        lines = [line for line in str(e).splitlines() if line.strip()]
        self.failed = f"{type(e).__name__}: {lines[0].strip() if lines else ''}"[:200]
        console.print(f"[yellow]torch.compile failed ({escape(self.failed)}); this rank goes "
                      f"on eagerly (set train.compile=off to skip the attempt)", soft_wrap=True,
                      highlight=False)
        for part in self.parts:
            part._compiled_call_impl = None

    def report(self) -> dict:
        return {"compiled_modules": 0 if self.failed else len(self.parts), "off": self.failed}


def _eager_only(modules) -> str | None:
    """What in these modules compiling must leave alone, or None."""
    if any(isinstance(m, _ReplicaStats) for mod in modules for m in mod.modules()):
        # its statistics are all-reduced across replicas inside the forward, over gloo
        return "pipeline.sync_bn's batch norm all-reduces inside the forward"
    return None


def compile_modules(cfg, modules, device: torch.device) -> CompiledModules | None:
    """Compiles `modules`' step work when train.compile asks for it on `device` (None when it
    runs eagerly; `compile_skip_reason` says why)."""
    why = compile_skip_reason(cfg.train.compile, device) or _eager_only(modules)
    if why is None:
        # on CPU, inductor would turn convolutions channels-last and hand back gradients in
        # that layout, which gloo will not send (CPU ranks give gloo their tensors as they are)
        return CompiledModules(modules, options={"layout_optimization": False}
                               if device.type == "cpu" else None)
    if cfg.train.compile == "on" or (device.type == "cuda" and not why.startswith("train.")):
        console.print(f"[yellow]train.compile={cfg.train.compile}: {why}; this rank runs "
                      f"eagerly", soft_wrap=True, highlight=False)
    return None

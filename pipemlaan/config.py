"""Typed configuration: dataclass defaults < TOML file < `--section.key=value` CLI overrides.

Every field has a `help` string (shown by `python -m pipemlaan.train --help-config`, and as
docs/config.md by `--help-config --markdown`). Validation runs at start-up on every rank, before any
compute or file is written, and raises `ConfigError` with one line naming the fix.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipemlaan.errors import ConfigError
from pipemlaan.models import features, num_blocks

# model names come from the registry (pipemlaan.models.register, models/registry.py)
METHODS = ("bp", "dgl", "infopro", "linear")
DATASETS = ("fashion_mnist", "cifar10", "svhn", "stl10", "imagenet", "synthetic")
MODES = ("lockstep", "async")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name: str = _f("resnet20", "backbone: CIFAR ResNets resnet8/14/20/32/44/56/110 (any 6n+2 "
                   "depth as resnetD), ImageNet resnet34/101/152, Vision Transformers "
                   "vit_micro/vit_tiny/vit_small (patch 4) and vit_b_16, or a name registered "
                   "with pipemlaan.models.register (docs/backbones.md)")
    plugin: str = _f("", "Python module imported before model.name is looked up, on every "
                     "rank: it registers the user's own backbones (docs/backbones.md)")
    K: int = _f(4, "number of local modules, paper numbering: K = blocks + 1 puts the stem in a "
                "module of its own; smaller K merges the stem into the first module")
    width: int = _f(16, "channels of the first CIFAR stage (16 in the paper); stages double it")
    zero_init_last_bn: str = _f("auto", "auto | on | off: start every residual block's last "
                                "BatchNorm weight at 0 (auto: on for the ImageNet ResNets, off "
                                "for the CIFAR ones; the reference code zero-inits ResNet-34 "
                                "only, from its commit 1589c61 on: docs/method.md)")


@dataclass
class MethodConfig:
    name: str = _f("dgl", "bp (end-to-end backprop) or the independent head kind: dgl, infopro, "
                   "linear")
    mlm: bool = _f(True, "multilaminar local modules: cascaded windows of `window` modules")
    window: int = _f(2, "modules per cascade window (MLM); 2 in the reference MLAAN code")
    lam: bool = _f(True, "leap augmented modules: downstream block copies with an EMA twin")
    ema_decay: float = _f(0.995, "EMA decay m of the twin: ema = m * ema + (1 - m) * live")
    ema_only_last: bool = _f(False, "reproduce the reference CIFAR code: update only the last "
                             "module's EMA twin each step (default: every twin)")
    w_g: float = _f(0.001, "weight of the independent head loss when a window loss exists")
    w_h: float = _f(0.999, "weight of the cascaded / leap head loss")
    first_modules_head: bool = _f(False, "MLM: give the modules before the first window (the "
                                  "first window-1, and a stem of its own) an independent head; "
                                  "false = the reference: they learn only through the windows "
                                  "downstream, the first of which reaches back to the stem")
    heads: str = _f("reference", "reference (the authors' auxiliary heads for each variant, "
                    "leap heads ending in the variant's head) or compact (smaller dgl/infopro "
                    "heads, leap heads ending in pool + linear)")
    infopro_recon: list = _f([5.0, 0.0], "InfoPro reconstruction weight [first, last], "
                             "interpolated linearly (see method.infopro_ratio)")
    infopro_ce: list = _f([0.5, 1.0], "InfoPro classification weight [first, last] (InfoPro's "
                          "runs for K >= 4; the MLAAN paper recipes set [0.5, 0.0] as its runs)")
    infopro_ratio: str = _f("auto", "what InfoPro weights interpolate over: module (index / "
                            "(K-2)), stage (stage of the module's last block / (K-2), at most "
                            "1, as the reference InfoPro* code) or auto (stage with mlm or lam, "
                            "else module)")
    leap_init: str = _f("auto", "auto | copy | fresh: leap copies start equal to the blocks "
                        "they copy, or freshly initialised, the twin drawn separately (auto: "
                        "fresh for ImageNet ResNets, copy for CIFAR, as the reference)")
    token_pool: str = _f("mean", "token features (ViTs): how the auxiliary heads pool the "
                         "tokens: mean (over all tokens) or cls (the class token)")
    head_width: int = _f(0, "heads=reference: feature width of the dgl/infopro heads (0 = 128); "
                         "heads=compact: their hidden width (0 = the module's channels)")


@dataclass
class DataConfig:
    name: str = _f("fashion_mnist", "fashion_mnist | cifar10 | svhn | stl10 | imagenet | "
                   "synthetic")
    root: str = _f("", "data folder; empty = the dataset's default (Fashion-MNIST: "
                   "/usr/share/datasets/fashion-mnist, others: data/<name>)")
    download: bool = _f(False, "let torchvision download CIFAR-10/SVHN/STL-10 into `root` when "
                        "missing (needs internet)")
    augment: bool = _f(True, "the reference training augmentation for the dataset")
    train_subset: int = _f(0, "train on N training samples drawn class by class (each class "
                           "keeps its share, at least one sample; the same N samples whatever "
                           "train.seed is); 0 = all")
    test_subset: int = _f(0, "test on N test samples drawn class by class, as train_subset; "
                          "0 = all")
    synthetic_size: int = _f(2048, "training samples of the synthetic dataset")
    synthetic_image: list = _f([3, 32, 32], "channels, height, width of synthetic images")
    workers: int = _f(4, "loader processes for the ImageNet folder dataset (started once, "
                      "kept for the whole run)")
    decode: str = _f("cpu", "ImageNet JPEG decoding: cpu (PIL in the loader processes, the "
                     "reference) or gpu (torchvision.io.decode_jpeg on the training GPU in "
                     "batches; needs CUDA)")


@dataclass
class TrainConfig:
    epochs: int = _f(10, "training epochs")
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = no limit)")
    batch_size: int = _f(128, "images per step (every module takes one optimizer step per batch)")
    lr: float = _f(0.1, "peak learning rate (after warm-up)")
    warmup_epochs: float = _f(0.0, "linear warm-up from `warmup_lr` to `lr` over this many epochs")
    warmup_lr: float = _f(0.01, "learning rate at the start of warm-up")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(1e-4, "SGD weight decay")
    lr_mult_backbone: float = _f(1.0, "lr multiplier for backbone blocks (paper's eta_l)")
    lr_mult_g: float = _f(1.0, "lr multiplier for independent heads g (paper's eta_alpha)")
    lr_mult_h: float = _f(1.0, "lr multiplier for cascade / leap heads h (paper's eta_c)")
    seed: int = _f(0, "seed of weights, data order and augmentation")
    eval_every: int = _f(1, "evaluate every N epochs (the last epoch is always evaluated)")
    eval_every_steps: int = _f(0, "also evaluate every N training steps within epochs (0 = "
                                  "only at epoch ends): error-against-time curves")
    device: str = _f("auto", "auto | cpu | cuda (auto: cuda when available)")
    threads: int = _f(0, "torch CPU threads per rank (0 = leave torch's default)")
    nonfinite: str = _f("stop", "a NaN/Inf loss: stop (the run ends naming rank, module and "
                        "step) or skip (that module drops the batch's update and goes on)")
    bf16: bool = _f(True, "bf16 autocast on CUDA (CPU runs stay fp32)")
    channels_last: bool = _f(True, "channels-last memory format of modules and activations on "
                             "CUDA (CPU runs stay contiguous)")
    cudnn_benchmark: bool = _f(False, "let cuDNN pick convolution algorithms by timing them "
                               "(faster; runs are then not bit-equal across processes)")
    cuda_graphs: bool = _f(True, "record a single-process training step as a CUDA graph and "
                           "replay it (CUDA, one stage, no replicas; pipeline ranks run eagerly)")
    deterministic: bool = _f(False, "deterministic algorithms (torch and cuDNN): bit-equal runs "
                             "on CUDA across processes, at some speed")
    compile: str = _f("off", "off | on | auto: torch.compile (inductor) each module's body and "
                      "heads, eager if compiling fails (auto: on for CUDA ranks when triton is "
                      "installed, off on CPU; composes with train.cuda_graphs)")
    peak_tflops: float = _f(0.0, "dense peak TFLOP/s of one device, for the share of peak a "
                            "rank's FLOP rate reaches (0 = auto: the datasheet figure of known "
                            "GPUs, a measured fp32 matmul on CPU)")


@dataclass
class RunConfig:
    name: str = _f("", "run name, the run folder's name; empty = <dataset>-<model>-K<K>-"
                   "<method>, e.g. fashion_mnist-resnet20-K4-dgl-mlaan (bp: no K)")
    dir: str = _f("runs", "parent folder of run directories")
    resume: bool = _f(False, "continue from the last complete checkpoint in the run directory")
    overwrite: bool = _f(False, "replace an existing run directory instead of refusing")
    log_every: int = _f(20, "write a metrics.jsonl line every N steps")
    checkpoint_every: int = _f(1, "write checkpoints every N epochs (and at the end)")
    checkpoint_steps: int = _f(0, "also write a checkpoint every N steps (0 = only per epoch)")
    progress: bool = _f(True, "progress on rank 0: a rich progress bar and live stage view on "
                        "a terminal, a plain line every run.log_every steps elsewhere (a log "
                        "file, SLURM, CI)")
    profile_steps: list = _f([], "[first, last] training steps to trace with torch.profiler "
                             "(one Perfetto/Chrome trace per rank in <run>/traces/); [] = off")
    tensorboard: bool = _f(True, "TensorBoard event files, one folder per rank in "
                           "<run>/tensorboard/ (`tensorboard --logdir <run>/tensorboard`): "
                           "losses, images/s, time shares, memory, evaluations, learning "
                           "rate. On by default, as Lightning users expect: it costs one small "
                           "file write per rank per logging window")
    wandb: bool = _f(False, "also log the same to Weights & Biases (one W&B run per rank, "
                     "grouped by the run name, files in <run>/wandb/; WANDB_MODE=offline "
                     "works without a network) when the wandb package is installed")


@dataclass
class PipelineConfig:
    mode: str = _f("async", "lockstep (one batch in flight, equals the single-process run) or "
                   "async (several in flight, throughput)")
    partition: list = _f([], "modules per stage (rank of a replica), e.g. [2, 2]; empty = "
                         "balanced from measured cost")
    in_flight: int = _f(2, "batches in flight per rank in async mode (>= 1); each one "
                           "beyond the first delays window gradients a step (faster, less "
                           "accurate on short runs: docs/method.md)")
    emulate_async: list = _f([], "one process only: delay window gradients and LAM snapshots "
                             "exactly as an async pipeline with these module counts per rank "
                             "and pipeline.in_flight in flight would (what staleness alone "
                             "costs); [] = off")
    emulate_delay: str = _f("both", "with emulate_async: which staleness the one process "
                            "emulates, both, window (window gradients alone) or lam (LAM "
                            "snapshots alone), to tell their costs apart")
    predict_weights: bool = _f(False, "async: modules whose window gradient comes a step late "
                               "run their forward on weights predicted along the momentum "
                               "(w - (in_flight-1) x lr x momentum buffer, SpecTrain), so "
                               "the late gradient is taken near the weights it updates")
    local_first: bool = _f(False, "async: a module whose window gradient comes from a later "
                           "rank applies its own losses' gradient at once (one more backward "
                           "of its body per step) and the late window gradient with the next "
                           "batch's update (docs/method.md#async-staleness)")
    stale_lr: float = _f(0.5, "async: learning-rate multiplier for the bodies whose update "
                         "comes in_flight-1 steps late (their window gradient crosses a rank): "
                         "halved, a delayed step is unstable at a smaller lr; 1 = as every "
                         "other module (docs/method.md#async-staleness)")
    stale_momentum: float = _f(-1.0, "async: SGD momentum of the bodies whose update comes "
                               "late; -1 = train.momentum (docs/method.md#async-staleness)")
    lam_sync_every: int = _f(1, "steps between LAM weight broadcasts from owner to twin ranks")
    timeout_s: float = _f(120.0, "seconds any wait on a peer may take before the run stops "
                          "with an error naming that peer")
    backend: str = _f("auto", "auto | gloo | nccl (auto: nccl with one GPU per rank, gloo on "
                      "CPU, gloo through host memory when ranks share a GPU)")
    replicas: int = _f(1, "data-parallel copies D of the pipeline: the world's R ranks run D "
                       "pipelines of R/D stages; train.batch_size stays the global batch")
    sync_bn: bool = _f(False, "with replicas > 1, BatchNorm statistics over the whole global "
                       "batch (equals the single process; 2 all-reduces per layer) instead of "
                       "per replica, as DDP does")


SECTIONS = {
    "model": ModelConfig, "method": MethodConfig, "data": DataConfig,
    "train": TrainConfig, "run": RunConfig, "pipeline": PipelineConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    @property
    def run_name(self) -> str:
        if self.run.name:
            return self.run.name
        label = method_label(self.method).replace("+", "-")
        if self.method.name == "bp":      # one end-to-end module whatever model.K says
            return f"{self.data.name}-{self.model.name}-{label}"
        return f"{self.data.name}-{self.model.name}-K{self.model.K}-{label}"

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# a method's label (what benchmarks, tables and run names call it) <-> its three keys
_MIXES = {"": (False, False), "mlm": (True, False), "lam": (False, True), "mlaan": (True, True)}


def method_label(m: MethodConfig) -> str:
    """A short name for a method setting: bp, dgl, dgl+mlm, dgl+lam, dgl+mlaan, ..."""
    if m.name == "bp":
        return "bp"
    mix = next(k for k, v in _MIXES.items() if v == (m.mlm, m.lam))
    return m.name + (f"+{mix}" if mix else "")


def parse_method(label: str) -> tuple[str, bool, bool]:
    """'dgl+mlaan' -> ('dgl', mlm=True, lam=True); the inverse of `method_label`."""
    name, _, mix = label.partition("+")
    if name not in METHODS or mix not in _MIXES or (name == "bp" and mix):
        raise ConfigError(f"unknown method {label!r}: write NAME, NAME+mlm, NAME+lam or "
                          f"NAME+mlaan with NAME one of {', '.join(METHODS)} (bp alone)")
    return (name, *_MIXES[mix])


def method_flags(label: str) -> list[str]:
    """The `--section.key=value` overrides that select a method by its label."""
    name, mlm, lam = parse_method(label)
    return [f"--method.name={name}", f"--method.mlm={str(mlm).lower()}",
            f"--method.lam={str(lam).lower()}"]


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Converts a TOML or CLI value to the type of the field's default."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{where}={value!r}: expected true or false")
        if kind is list:
            try:
                parsed = tomllib.loads(f"v = {text}")["v"] if text else []
            except tomllib.TOMLDecodeError:
                parsed = [p.strip() for p in text.split(",") if p.strip()]
            value = parsed if isinstance(parsed, list) else [parsed]
            return [_num(v) for v in value]
        try:
            return kind(text)
        except ValueError:
            raise ConfigError(f"{where}={value!r}: expected a {kind.__name__}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}={value!r}: expected true or false")
    if kind is list and not isinstance(value, list):
        raise ConfigError(f"{where}={value!r}: expected a list such as [2, 2]")
    if kind in (int, float, str) and not isinstance(value, kind):
        raise ConfigError(f"{where}={value!r}: expected a {kind.__name__}")
    return value


def _num(v: Any) -> Any:
    if isinstance(v, str):
        for conv in (int, float):
            try:
                return conv(v)
            except ValueError:
                pass
    return v


# keys renamed: old name -> new name, accepted for now with a one-line notice
RENAMED = {"pipeline.microbatches": "pipeline.in_flight"}


def _apply(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    new = RENAMED.get(f"{section}.{key}")
    if new is not None:
        if os.environ.get("RANK", "0") == "0":      # once per launch, not once per rank
            sys.stderr.write(f"pipemlaan: {section}.{key} is now {new} ({origin}); the old "
                             f"name will go\n")
        section, key = new.split(".")
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown section [{section}]; sections are "
                          f"{', '.join(SECTIONS)}")
    sub = getattr(cfg, section)
    names = [f.name for f in dataclasses.fields(sub)]
    if key not in names:
        raise ConfigError(f"{origin}: unknown key {section}.{key}; keys of [{section}] are "
                          f"{', '.join(names)}")
    setattr(sub, key, _coerce(value, getattr(sub, key), f"{section}.{key}"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Builds a validated Config from an optional TOML file and `section.key=value` overrides."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; pass --config configs/<name>.toml "
                              f"(see the configs/ folder)")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML ({e}); fix the file") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{p}: top-level key {section!r} must be a [section] table")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(p))
    for item in overrides or []:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text or "." not in text.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: write it as --section.key=value, "
                              f"e.g. --train.epochs=2")
        dotted, value = text.split("=", 1)
        section, key = dotted.split(".", 1)
        _apply(cfg, section, key, value, "command line")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need no data or process group; raises ConfigError naming the fix."""
    m, meth, d, t, p = cfg.model, cfg.method, cfg.data, cfg.train, cfg.pipeline
    if m.plugin:
        try:
            importlib.import_module(m.plugin)
        except ImportError as e:
            raise ConfigError(f"model.plugin={m.plugin!r} cannot be imported ({e}); put its "
                              f"folder on PYTHONPATH or run from it") from None
    blocks = num_blocks(m.name)
    if features(m.name) == "tokens" and meth.name == "infopro":
        raise ConfigError(f"method.name=infopro reconstructs the image from feature maps, but "
                          f"{m.name} gives tokens and has no sound token decoder; use "
                          f"method.name=dgl or linear")
    if meth.name not in METHODS:
        raise ConfigError(f"method.name={meth.name!r} is unknown; use one of {', '.join(METHODS)}")
    if d.name not in DATASETS:
        raise ConfigError(f"data.name={d.name!r} is unknown; use one of {', '.join(DATASETS)}")
    if p.mode not in MODES:
        raise ConfigError(f"pipeline.mode={p.mode!r} is unknown; use lockstep or async")
    if p.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"pipeline.backend={p.backend!r} is unknown; use auto, gloo or nccl")
    if t.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.nonfinite={t.nonfinite!r} is unknown; use stop or skip")
    ps = cfg.run.profile_steps
    if ps and (len(ps) != 2 or not all(isinstance(v, int) for v in ps) or not 0 <= ps[0] <= ps[1]):
        raise ConfigError(f"run.profile_steps={ps} must be [first, last] with 0 <= first <= "
                          f"last (training steps), or [] to trace nothing")
    if cfg.run.checkpoint_steps < 0:
        raise ConfigError("run.checkpoint_steps must be >= 0 (0 = only per epoch)")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device={t.device!r} is unknown; use auto, cpu or cuda")
    if m.K < 1:
        raise ConfigError(f"model.K={m.K}: needs at least 1 local module")
    if m.K > blocks + 1 and meth.name != "bp":
        raise ConfigError(f"model.K={m.K} is impossible for {m.name}: it has {blocks} residual "
                          f"blocks, so K must lie in 1..{blocks + 1} (K={blocks + 1} = stem + "
                          f"one block per module)")
    if meth.window < 1:
        raise ConfigError(f"method.window={meth.window}: a cascade window holds at least 1 module")
    if meth.mlm and meth.window > m.K and meth.name != "bp":
        raise ConfigError(f"method.window={meth.window} is larger than model.K={m.K}; lower "
                          f"method.window or raise model.K")
    if not 0.0 <= meth.ema_decay <= 1.0:
        raise ConfigError(f"method.ema_decay={meth.ema_decay}: must lie in [0, 1]")
    for key, value, allowed in (("model.zero_init_last_bn", m.zero_init_last_bn,
                                 ("auto", "on", "off")),
                                ("method.heads", meth.heads, ("reference", "compact")),
                                ("method.infopro_ratio", meth.infopro_ratio,
                                 ("auto", "stage", "module")),
                                ("method.leap_init", meth.leap_init, ("auto", "copy", "fresh")),
                                ("method.token_pool", meth.token_pool, ("mean", "cls")),
                                ("train.compile", t.compile, ("off", "on", "auto")),
                                ("data.decode", d.decode, ("cpu", "gpu")),
                                ("pipeline.emulate_delay", p.emulate_delay,
                                 ("both", "window", "lam"))):
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is unknown; use one of {', '.join(allowed)}")
    if len(meth.infopro_recon) != 2 or len(meth.infopro_ce) != 2:
        raise ConfigError("method.infopro_recon and method.infopro_ce take two numbers: "
                          "[first module, last module]")
    if d.decode == "gpu" and (t.device == "cpu" or (t.device == "auto"
                                                   and not torch.cuda.is_available())):
        raise ConfigError(f"data.decode=gpu decodes JPEGs on the GPU but this run has none "
                          f"(train.device={t.device}); set data.decode=cpu, or run on CUDA")
    if len(d.synthetic_image) != 3:
        raise ConfigError("data.synthetic_image takes [channels, height, width]")
    if t.batch_size < 1:
        raise ConfigError(f"train.batch_size={t.batch_size}: must be at least 1")
    if t.epochs < 1:
        raise ConfigError(f"train.epochs={t.epochs}: must be at least 1")
    if t.max_steps < 0:
        raise ConfigError(f"train.max_steps={t.max_steps}: use 0 for no limit")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr}: must be positive")
    if t.peak_tflops < 0:
        raise ConfigError(f"train.peak_tflops={t.peak_tflops}: use 0 for auto, or one "
                          f"device's dense peak TFLOP/s")
    if p.in_flight < 1:
        raise ConfigError(f"pipeline.in_flight={p.in_flight}: must be at least 1")
    if not p.stale_lr > 0:
        raise ConfigError(f"pipeline.stale_lr={p.stale_lr}: must be above 0 (1 = off)")
    if not (p.stale_momentum == -1 or 0 <= p.stale_momentum < 1):
        raise ConfigError(f"pipeline.stale_momentum={p.stale_momentum}: use -1 (train.momentum) "
                          f"or a momentum in [0, 1)")
    if p.lam_sync_every < 1:
        raise ConfigError(f"pipeline.lam_sync_every={p.lam_sync_every}: must be at least 1")
    if p.replicas < 1:
        raise ConfigError(f"pipeline.replicas={p.replicas}: must be at least 1")
    if p.timeout_s <= 0:
        raise ConfigError(f"pipeline.timeout_s={p.timeout_s}: must be positive")
    if any((not isinstance(n, int)) or n < 1 for n in p.partition):
        raise ConfigError(f"pipeline.partition={p.partition}: give a positive module count per "
                          f"rank, e.g. [2, 2]")
    if any((not isinstance(n, int)) or n < 1 for n in p.emulate_async):
        raise ConfigError(f"pipeline.emulate_async={p.emulate_async}: give a positive module "
                          f"count per emulated rank, e.g. [1, 1, 1, 1]")
    if p.partition and sum(p.partition) != (1 if meth.name == "bp" else m.K):
        raise ConfigError(f"pipeline.partition={p.partition} sums to {sum(p.partition)} but "
                          f"model.K={m.K}; make the counts add up to K")
    if cfg.run.log_every < 1 or cfg.run.checkpoint_every < 1 or t.eval_every < 1:
        raise ConfigError("run.log_every, run.checkpoint_every and train.eval_every must be >= 1")
    if t.eval_every_steps < 0:
        raise ConfigError(f"train.eval_every_steps={t.eval_every_steps}: use 0 (off) or a "
                          f"positive number of steps")


def validate_world(cfg: Config, world_size: int, num_modules: int) -> None:
    """Checks that depend on the number of ranks."""
    D = cfg.pipeline.replicas
    if world_size % D:
        raise ConfigError(f"pipeline.replicas={D} does not divide the {world_size} ranks; launch "
                          f"a multiple of {D} ranks (replicas x stages)")
    stages = world_size // D
    if cfg.train.batch_size % D:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (the global batch) does not "
                          f"split evenly over pipeline.replicas={D}; use a multiple of {D}")
    if cfg.method.name == "bp" and stages > 1:
        raise ConfigError("method.name=bp trains one end-to-end module, so it cannot be split "
                          "into stages; run it on one rank, or with pipeline.replicas equal to "
                          "the number of ranks (data parallel)")
    if stages > num_modules:
        raise ConfigError(f"{world_size} ranks give {stages} pipeline stages per replica but "
                          f"only model.K={num_modules} local modules; use at most "
                          f"{num_modules} stages (ranks / pipeline.replicas) or raise model.K")
    part = cfg.pipeline.partition
    if part and stages > 1 and len(part) != stages:
        raise ConfigError(f"pipeline.partition={part} has {len(part)} entries but there are "
                          f"{stages} stages per replica; give one count per stage or leave it "
                          f"empty")


def to_toml(cfg: Config) -> str:
    """Serialises the resolved config (every key, every section) as TOML."""
    lines = []
    for section, sub in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in sub.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def describe(level: int = 3) -> str:
    """The config reference as Markdown, one table per section under headings of `level`
    (`--help-config`; docs/config.md is `--help-config --markdown`, pipemlaan/train.py)."""
    out = []
    for section, cls in SECTIONS.items():
        out.append(f"{'#' * level} [{section}]\n\n| key | default | meaning |\n|---|---|---|")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meaning = f.metadata["help"].replace("|", "\\|")
            out.append(f"| `{section}.{f.name}` | `{_toml_value(default)}` | {meaning} |")
        out.append("")
    return "\n".join(out)

"""Backbones through the registry (pipemlaan/models/registry.py, docs/backbones.md): a user's
own network and torchvision's Vision Transformers, cut into local modules and trained in one
process and as a lockstep pipeline.

- the ViT's parts (stem, encoder layers, classifier) compose to torchvision's own forward;
  vit_b_16 is torchvision's at ImageNet shapes; Fashion-MNIST shapes (1x28x28, patch 4) give
  7x7 tokens + the class token;
- token heads, leap copies of the following encoder layers with their EMA twin, windows;
  attention is counted in the costs;
- InfoPro on tokens is refused with one line naming why; unknown names list the registry;
- a user's network of feature maps gets the ResNet heads (dgl, infopro, linear) and the
  general LAM rule over its stages;
- the residual MLP of docs/backbones.md (its code block, run as written) registers through
  `model.plugin`, trains in one process and as a 2-rank lockstep pipeline equal to it;
- vit_micro with DGL+MLAAN on Fashion-MNIST shapes: a 2-rank lockstep pipeline equals one
  process (losses of every module at every step, every parameter, within 1e-5);
- a torchrun launch imports `model.plugin` on every rank and trains the user's network (slow).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:xdist tests/test_backbones.py
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torchvision.models import VisionTransformer

from pipemlaan.config import load_config, method_flags
from pipemlaan.data import dataset_spec
from pipemlaan.engine.costs import count_module_costs
from pipemlaan.errors import ConfigError
from pipemlaan.local.heads import LeapHead
from pipemlaan.local.module import build_local_modules, ema_update, block_state
from pipemlaan.local.token_heads import TokenHead
from pipemlaan.models import Backbone, BlockInfo, build_backbone, lookup, num_blocks, register
from pipemlaan.models.split import lam_copies, module_ranges
from pipemlaan.models.vit import vit_backbone

from inprocess import run_ranks
from launching import launch_env, run_to_end, train_cmd, unique_name
from runs import RunOutputs, assert_losses_match, assert_params_match

REPO = Path(__file__).resolve().parents[1]
FMNIST_SHAPE = ["--data.name=synthetic", "--data.synthetic_image=[1,28,28]"]
VIT = [*FMNIST_SHAPE, "--model.name=vit_micro", "--model.K=4", *method_flags("dgl+mlaan")]
STEPS = 4       # synthetic_size / batch_size, one epoch
SHORT = ["--data.synthetic_size=64", "--train.batch_size=16", "--train.epochs=1",
         "--train.lr=0.01", "--train.threads=1", "--train.device=cpu", "--run.log_every=1",
         "--pipeline.mode=lockstep"]


# ---- ViTs -----------------------------------------------------------------------------------
def test_vit_parts_compose_to_torchvisions_forward():
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=4, num_layers=3, num_heads=2,
                            hidden_dim=32, mlp_dim=64, num_classes=10)
    torch.nn.init.normal_(vit.heads.head.weight)     # torchvision starts it at zero
    vit.eval()
    x = torch.randn(2, 3, 32, 32)
    want = vit(x)
    bb = vit_backbone("test", vit, 3)
    assert len(bb.blocks) == 4 and bb.stage_sizes == [3]
    y = x
    for block in bb.blocks:
        y = block(y)
    assert y.shape == (2, 1 + 8 * 8, 32)
    assert torch.equal(bb.classifier(y), want)


def test_vit_b_16_is_torchvisions_at_imagenet_shapes():
    bb = build_backbone("vit_b_16", 3, 1000, image_size=(224, 224))
    assert bb.num_blocks == num_blocks("vit_b_16") == 12
    assert sum(p.numel() for p in bb.blocks[1].parameters()) == 7_087_872    # one ViT-B layer
    with torch.no_grad():
        assert bb.blocks[0](torch.zeros(1, 3, 224, 224)).shape == (1, 197, 768)


def test_fashion_mnist_shapes_give_7x7_tokens_and_token_heads():
    cfg = load_config(None, VIT)
    bb, mods = build_local_modules(cfg, dataset_spec(cfg.data))
    assert bb.blocks[0].conv_proj.in_channels == 1
    assert [m.block_range for m in mods] == [(0, 1), (2, 2), (3, 3), (4, 4)]
    x = torch.randn(2, 1, 28, 28)
    labels = torch.tensor([3, 7])
    for m in mods:
        x = m.body(x)
        assert x.shape == (2, 50, 64)
        for head in (m.g, m.h):
            if head is not None:
                loss, logits = head(x, labels, None)
                assert logits.shape == (2, 10) and torch.isfinite(loss)
    # reference MLAAN plan: module 0 learns through window 1; windows end in leap networks
    assert mods[0].g is None and isinstance(mods[1].g, TokenHead)
    assert isinstance(mods[1].h, LeapHead) and isinstance(mods[1].h.classifier, TokenHead)


def test_leap_copies_are_the_next_and_the_last_encoder_layer_with_an_ema_twin():
    cfg = load_config(None, VIT)
    bb, mods = build_local_modules(cfg, dataset_spec(cfg.data))
    ranges = module_ranges(bb, 4)
    assert [lam_copies(bb, ranges, i) for i in range(4)] == [[2, 4], [3, 4], [4], []]
    leap = mods[1].h
    assert mods[1].twin_source == 3
    for copy, src in zip(leap.copies, [3, 4]):     # copies start equal to the live layers
        for a, b in zip(copy.state_dict().values(), bb.blocks[src].state_dict().values()):
            assert torch.equal(a, b)
    assert not any(p.requires_grad for p in leap.twin.parameters())
    # the EMA moves the twin toward the live layer (LayerNorm and attention weights alike)
    live = [t + 1.0 for t in block_state(bb.blocks[3])]
    before = [t.clone() for t in block_state(leap.twin)]
    ema_update(leap.twin, live, 0.5)
    for b, a, lv in zip(before, block_state(leap.twin), live):
        assert torch.allclose(a, 0.5 * b + 0.5 * lv)


def test_attention_is_counted_in_the_costs():
    cfg = load_config(None, VIT)
    _, mods = build_local_modules(cfg, dataset_spec(cfg.data))
    costs = count_module_costs(mods, (1, 28, 28))
    # the last module is one encoder layer + the classifier: L=50 tokens, width 64, MLP 256
    L, d = 50, 64
    attention = L * d * (4 * d + 2 * L)           # q, k, v, out projections; QK^T; AV
    mlp = 2 * L * d * 4 * d
    assert costs[-1].macs == attention + mlp + d * 10


def test_infopro_on_tokens_is_refused_naming_why():
    with pytest.raises(ConfigError, match="no sound token decoder; use method.name=dgl"):
        load_config(None, [*VIT, "--method.name=infopro"])


def test_unknown_model_lists_the_registry():
    with pytest.raises(ConfigError, match="vit_tiny.*register your own"):
        load_config(None, ["--model.name=vit_huge"])
    assert lookup("resnet32").family == "cifar" and lookup("resnet34").family == "imagenet"


# ---- a user's network through the documented door ---------------------------------------
@pytest.fixture(scope="module")
def resmlp_plugin(tmp_path_factory) -> str:
    """docs/backbones.md's example, as written there, saved as a module on sys.path."""
    text = (REPO / "docs" / "backbones.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "register(" in b)
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "resmlp.py").write_text(code)
    sys.path.insert(0, str(folder))
    yield "resmlp"
    sys.path.remove(str(folder))
    sys.modules.pop("resmlp", None)


@dataclass
class Run(RunOutputs):
    key: str
    run_dir: Path


def _run(tmp_path: Path, name: str, args: list[str], ranks: int) -> Run:
    run_ranks([*args, *SHORT, f"--run.dir={tmp_path}", f"--run.name={name}"], ranks)
    return Run(name, tmp_path / name)


def _tiny_conv(args):
    """A user's network of feature maps: a conv stem and two stages of conv blocks."""
    def block(cin, cout, stride):
        return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, stride, 1),
                                   torch.nn.BatchNorm2d(cout), torch.nn.ReLU())
    c = args.in_channels
    blocks = [block(c, 8, 1), block(8, 8, 1), block(8, 8, 1), block(8, 16, 2), block(16, 16, 1)]
    info = [BlockInfo(0, 0, c, 8, 1), BlockInfo(1, 0, 8, 8, 1), BlockInfo(1, 1, 8, 8, 1),
            BlockInfo(2, 0, 8, 16, 2), BlockInfo(2, 1, 16, 16, 1)]
    classifier = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                     torch.nn.Linear(16, args.num_classes))
    return Backbone("tinyconv", blocks, info, classifier, [2, 2])


@pytest.mark.parametrize("method", ["dgl+mlaan", "infopro+mlaan", "linear+lam"])
def test_a_user_network_of_feature_maps_gets_the_resnet_heads(method):
    register("tinyconv", _tiny_conv, num_blocks=4)
    cfg = load_config(None, [*FMNIST_SHAPE, "--model.name=tinyconv", "--model.K=3",
                             *method_flags(method)])
    bb, mods = build_local_modules(cfg, dataset_spec(cfg.data))
    # general LAM rule: module 1 (block 2) copies stage 2's first block (3) and the last (4)
    assert [m.block_range for m in mods] == [(0, 1), (2, 2), (3, 4)]
    assert mods[1].twin_source == 3 and len(mods[1].h.copies) == 2
    x = images = torch.randn(4, 1, 28, 28)
    labels = torch.tensor([0, 1, 2, 3])
    for m in mods:
        x = m.body(x)
        for head in (m.g, m.h):
            if head is not None:
                loss, logits = head(x, labels, images)
                loss.backward(retain_graph=True)
                assert logits.shape == (4, 10) and torch.isfinite(loss)
    assert all(p.grad is not None for p in mods[0].body.parameters())


@pytest.mark.slow
def test_user_network_trains_alone_and_as_an_equal_lockstep_pipeline(tmp_path, resmlp_plugin):
    args = [*FMNIST_SHAPE, f"--model.plugin={resmlp_plugin}", "--model.name=resmlp",
            "--model.K=3", *method_flags("dgl+mlaan")]
    cfg = load_config(None, args)
    _, mods = build_local_modules(cfg, dataset_spec(cfg.data))
    assert [m.block_range for m in mods] == [(0, 1), (2, 2), (3, 4)]
    one = _run(tmp_path, "one", args, 1)
    two = _run(tmp_path, "two", [*args, "--pipeline.partition=[2,1]"], 2)
    assert two.summary()["world_size"] == 2 and two.summary()["partition"] == [2, 1]
    assert_losses_match(one, two, STEPS, 3)
    assert_params_match(one, two, 3)


# ---- ViT pipelines ----------------------------------------------------------------------------
@pytest.mark.slow
def test_vit_lockstep_pipeline_equals_one_process(tmp_path):
    one = _run(tmp_path, "one", VIT, 1)
    two = _run(tmp_path, "two", [*VIT, "--pipeline.partition=[2,2]"], 2)
    assert two.summary()["partition"] == [2, 2]
    assert_losses_match(one, two, STEPS, 4)
    assert_params_match(one, two, 4)


@pytest.mark.slow
def test_torchrun_imports_the_plugin_on_every_rank_and_trains(tmp_path, resmlp_plugin):
    """`model.plugin` as docs/backbones.md launches it: the user's module is imported by
    every rank's process (not only by this one), and the 2-rank pipeline trains."""
    name = unique_name("resmlp")
    folder = next(p for p in sys.path if (Path(p) / "resmlp.py").is_file())
    cmd = train_cmd(2, [*FMNIST_SHAPE, f"--model.plugin={resmlp_plugin}", "--model.name=resmlp",
                        "--model.K=3", *SHORT, "--train.max_steps=3",
                        f"--run.dir={tmp_path}", f"--run.name={name}"])
    env = launch_env(COLUMNS="1000", PYTHONPATH=f"{folder}:{REPO}")
    proc = run_to_end(cmd, tmp_path / "launch", name, env=env)
    assert proc.popen.returncode == 0, proc.describe()
    summary = Run(name, tmp_path / name).summary()
    assert summary["world_size"] == 2 and summary["steps"] == 3

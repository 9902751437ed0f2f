"""Tests of the backbones and their cut into local modules: the paper's configurations, the
reference-code split tables, the even rule, impossible K, and the LAM copy lists.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_models.py -q
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from pipemlaan.errors import ConfigError
from pipemlaan.models import build_backbone
from pipemlaan.models.split import lam_copies, module_ranges

TABLES = json.loads((Path(__file__).resolve().parents[1] / "pipemlaan" / "models" /
                     "reference_tables.json").read_text())

# (model, K) of the paper's experiments
PAPER = [("resnet32", 8), ("resnet32", 16), ("resnet110", 32), ("resnet110", 55),
         ("resnet34", 17), ("resnet101", 34), ("resnet152", 51)]
# configurations outside the reference tables (the general LAM rule and the even split rule)
GENERAL = [("resnet20", 4), ("resnet34", 5), ("resnet14", 4), ("resnet56", 7), ("resnet32", 5)]
IMAGENET = {"resnet34", "resnet101", "resnet152"}
EXPECTED_BLOCKS = {"resnet14": 6, "resnet20": 9, "resnet32": 15, "resnet56": 27,
                   "resnet110": 54, "resnet34": 16, "resnet101": 33, "resnet152": 50}


@lru_cache(maxsize=None)
def backbone(name: str):
    torch.manual_seed(0)
    if name in IMAGENET:
        b = build_backbone(name, 3, 1000)
    else:
        b = build_backbone(name, 3, 10)
    for blk in b.blocks:
        blk.eval()
    b.classifier.eval()
    return b


def input_for(name: str) -> torch.Tensor:
    side = 64 if name in IMAGENET else 32
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))


def cifar_flat(depth: int, stage: int, block: int) -> int:
    """Index in [stem, blocks...] of block `block` (0-based) of stage `stage` (1-based)."""
    per_stage = (depth - 2) // 6
    return 1 + (stage - 1) * per_stage + block


def even_ranges(n: int, K: int) -> list[tuple[int, int]]:
    """The documented even rule: residual runs differing by <= 1, the longer ones last, the
    stem carried by the first module."""
    base, extra = divmod(n, K)
    sizes = [base] * (K - extra) + [base + 1] * extra
    out, end = [], 0
    for i, s in enumerate(sizes):
        start = 0 if i == 0 else end + 1
        end = end + s
        out.append((start, end))
    return out


def check_partition(ranges, n_blocks: int, K: int) -> None:
    assert len(ranges) == K
    assert ranges[0][0] == 0 and ranges[-1][1] == n_blocks
    for (a, b), (c, d) in zip(ranges, ranges[1:]):
        assert a <= b and c == b + 1 and c <= d
    covered = [i for a, b in ranges for i in range(a, b + 1)]
    assert covered == list(range(n_blocks + 1))   # every block (stem included) exactly once


@torch.no_grad()
def module_outputs(b, ranges) -> list[torch.Tensor]:
    x = input_for(b.name)
    outs = []
    for first, last in ranges:
        for i in range(first, last + 1):
            x = b.blocks[i](x)
        assert x.shape[1] == b.info[last].out_channels
        outs.append(x)
    return outs


@pytest.mark.parametrize("name,K", PAPER, ids=[f"{m}-K{k}" for m, k in PAPER])
def test_paper_configuration_splits_and_chains(name, K):
    b = backbone(name)
    assert b.num_blocks == EXPECTED_BLOCKS[name]
    ranges = module_ranges(b, K)
    check_partition(ranges, b.num_blocks, K)
    outs = module_outputs(b, ranges)
    with torch.no_grad():
        logits = b.classifier(outs[-1])
    assert logits.shape == (1, 1000 if name in IMAGENET else 10)
    # LAM copies of every non-last module: strictly downstream, chaining from its output
    for i, (first, last) in enumerate(ranges):
        copies = lam_copies(b, ranges, i)
        if i == K - 1:
            assert copies == []
            continue
        assert copies, f"module {i} has no leap network"
        if name in IMAGENET:   # the reference tables there also copy a block of the same
            # stage at or just before the module (ImageNet/networks/configAux_new.py)
            assert all(1 <= c <= b.num_blocks for c in copies) and copies[-1] > last
        else:
            assert all(last < c <= b.num_blocks for c in copies), (i, (first, last), copies)
        assert b.info[copies[0]].in_channels == b.info[last].out_channels
        with torch.no_grad():
            y = outs[i]
            for c in copies:
                assert y.shape[1] == b.info[c].in_channels, (i, c)
                y = b.blocks[c](y)
            assert y.shape[1] == b.info[copies[-1]].out_channels
    if K == b.num_blocks + 1:   # paper numbering: the stem is a module of its own
        assert ranges == [(i, i) for i in range(K)]


@pytest.mark.parametrize("name", ["resnet14", "resnet32", "resnet110", "resnet34"])
def test_blocks_plus_one_puts_the_stem_alone(name):
    b = backbone(name)
    K = b.num_blocks + 1
    ranges = module_ranges(b, K)
    assert ranges[0] == (0, 0)
    assert ranges == [(i, i) for i in range(K)]
    # one fewer module: the stem is merged into the first module
    assert module_ranges(b, K - 1)[0] == (0, 1)


def table_cases():
    for model, by_k in TABLES["module_end_blocks"].items():
        for k in by_k:
            yield model, int(k)


@pytest.mark.parametrize("name,K", list(table_cases()))
def test_reference_table_splits_are_used(name, K):
    b = backbone(name)
    depth = int(name[6:])
    ends = [cifar_flat(depth, s, blk) for s, blk in TABLES["module_end_blocks"][name][str(K)]]
    ranges = module_ranges(b, K)
    check_partition(ranges, b.num_blocks, K)
    assert [last for _, last in ranges] == ends


def test_resnet110_K32_module_sizes_match_the_table():
    b = backbone("resnet110")
    ranges = module_ranges(b, 32)
    ends = [cifar_flat(110, s, blk) for s, blk in TABLES["module_end_blocks"]["resnet110"]["32"]]
    sizes = [e - s for s, e in zip([0] + ends[:-1], ends)]   # residual blocks per module
    assert [last - first + 1 - (first == 0) for first, last in ranges] == sizes
    assert len(set(sizes)) > 1   # the reference split is not uniform, so it really is the table


@pytest.mark.parametrize("K", sorted(int(k) for k in TABLES["module_end_blocks"]["resnet32"]))
def test_even_rule_reproduces_every_resnet32_table_entry(K):
    ends = [cifar_flat(32, s, blk) for s, blk in TABLES["module_end_blocks"]["resnet32"][str(K)]]
    assert [last for _, last in even_ranges(15, K)] == ends


@pytest.mark.parametrize("name,K", [("resnet20", 2), ("resnet20", 4), ("resnet20", 5),
                                    ("resnet20", 9), ("resnet56", 5), ("resnet56", 7),
                                    ("resnet14", 4), ("resnet34", 5), ("resnet101", 7),
                                    ("resnet110", 5)])
def test_even_rule_for_other_K(name, K):
    b = backbone(name)
    ranges = module_ranges(b, K)
    check_partition(ranges, b.num_blocks, K)
    residual = [last - first + 1 - (first == 0) for first, last in ranges]
    assert max(residual) - min(residual) <= 1
    assert residual == sorted(residual)          # the longer runs last
    assert ranges == even_ranges(b.num_blocks, K)
    module_outputs(b, ranges)


@pytest.mark.parametrize("name", ["resnet8", "resnet32", "resnet34"])
def test_impossible_K_raises_config_error(name):
    b = backbone(name) if name != "resnet8" else build_backbone("resnet8", 1, 10)
    for K in (0, -1, b.num_blocks + 2, 10 * b.num_blocks):
        with pytest.raises(ConfigError, match=r"model\.K"):
            module_ranges(b, K)
    module_ranges(b, b.num_blocks + 1)   # the largest possible K works
    module_ranges(b, 1)


def lam_table_entry(name: str, K: int, i: int, n: int):
    tables = TABLES["lam_copied_blocks"].get(name, {})
    if K == n + 1 and str(n) in tables:
        return tables[str(n)][i - 1]
    if K != n + 1 and str(K) in tables:
        return tables[str(K)][i]
    return None


@pytest.mark.parametrize("name,K", [("resnet32", 8), ("resnet32", 16), ("resnet110", 32),
                                    ("resnet110", 55)])
def test_lam_copies_come_from_the_reference_tables(name, K):
    b = backbone(name)
    depth = int(name[6:])
    ranges = module_ranges(b, K)
    stem_alone = K == b.num_blocks + 1
    # with the stem alone, paper module i is the reference code's module i-1; the stem itself
    # has no reference entry (only its downstream property is checked, in the paper test)
    for i in range(1 if stem_alone else 0, K - 1):
        entry = lam_table_entry(name, K, i, b.num_blocks)
        assert entry is not None
        assert lam_copies(b, ranges, i) == [cifar_flat(depth, s, blk) for s, blk in entry]


@pytest.mark.parametrize("name,K", GENERAL, ids=[f"{m}-K{k}" for m, k in GENERAL])
def test_lam_general_rule(name, K):
    b = backbone(name)
    ranges = module_ranges(b, K)
    outs = module_outputs(b, ranges)
    stage_firsts = [b.flat_index(s + 1, 0) for s in range(len(b.stage_sizes))]
    for i, (_, last) in enumerate(ranges[:-1]):
        copies = lam_copies(b, ranges, i)
        # documented: the first block of every stage starting after the module, then the last
        expected = [f for f in stage_firsts if f > last and f != b.num_blocks] + [b.num_blocks]
        assert copies == expected, i
        assert all(c > last for c in copies)
        assert b.info[copies[0]].in_channels == b.info[last].out_channels
        with torch.no_grad():
            y = outs[i]
            for c in copies:
                assert y.shape[1] == b.info[c].in_channels
                y = b.blocks[c](y)
        assert y.shape[1] == b.info[b.num_blocks].out_channels
    assert lam_copies(b, ranges, K - 1) == []


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet50", 16)])
def test_resnet18_and_resnet50_train_a_step(name, blocks):
    """The ImageNet ResNets outside the paper's tables are accepted, so they must work: their
    block counts, and one DGL+MLAAN step of every module at a tiny shape changes each module's
    weights and gives finite outputs."""
    from pipemlaan.config import load_config
    from pipemlaan.data import dataset_spec
    from pipemlaan.engine.stage import Stage
    from pipemlaan.local.module import build_local_modules, window_plan

    assert build_backbone(name, 3, 10).num_blocks == blocks
    cfg = load_config(None, ["--data.name=synthetic", "--data.synthetic_image=[3,64,64]",
                             f"--model.name={name}", "--model.K=4", "--train.device=cpu"])
    torch.manual_seed(0)
    _, mods = build_local_modules(cfg, dataset_spec(cfg.data))
    before = [[p.detach().clone() for p in m.parameters()] for m in mods]
    stage = Stage(cfg, mods, window_plan(cfg, len(mods)), torch.device("cpu"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out, upstream = stage.train_step(0, 0.1, x, torch.tensor([1, 7]), None)
    assert torch.isfinite(out).all() and upstream == []
    for m, old in zip(mods, before):
        assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), old)), m.index

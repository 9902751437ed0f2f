"""Where modules, blocks and twins live (engine/placement.py), on a real ResNet-20 cut into 8
modules with LAM, against placement worked out by hand from the modules themselves.

Run: .venv/bin/python -m pytest tests/test_placement.py -q
"""

from __future__ import annotations

import pytest

from pipemlaan.config import load_config
from pipemlaan.data import dataset_spec
from pipemlaan.engine.placement import Placement
from pipemlaan.local.module import build_local_modules


@pytest.fixture(scope="module")
def modules():
    cfg = load_config(None, ["--data.name=synthetic", "--data.synthetic_image=[3,8,8]",
                             "--model.name=resnet20", "--model.K=8"])
    return build_local_modules(cfg, dataset_spec(cfg.data))[1]


def test_grid_modules_and_blocks(modules):
    p = Placement.of([2, 3, 3], 2, modules)
    assert (p.stages, p.replicas, p.world) == (3, 2, 6)
    assert [p.seat(r) for r in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert all(p.rank_of(*p.seat(r)) == r for r in range(6))
    assert [list(p.modules_of(s)) for s in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    for s in range(3):
        for k in p.modules_of(s):
            assert p.stage_of_module(k) == s and p.last_module_of_stage(k) == p.modules_of(s)[-1]
            lo, hi = modules[k].block_range
            for b in range(lo, hi + 1):
                assert p.stage_of_block(b) == s
                assert p.owner(b, 1) == p.rank_of(1, s)


def test_twins_flows_and_ema_only_last(modules):
    twins = [(m.index, m.twin_source) for m in modules if m.twin_source is not None]
    assert len(twins) >= 3
    p = Placement.of([2, 3, 3], 1, modules)
    assert list(p.twins) == twins
    by_hand = {(p.stage_of_block(b), p.stage_of_module(k)) for k, b in twins
               if p.stage_of_block(b) != p.stage_of_module(k)}
    assert set(p.lam_flows) == by_hand and by_hand
    assert all(o > q for o, q in p.lam_flows)          # twins follow downstream blocks
    assert p.twin_stages == tuple(sorted({p.stage_of_module(k) for k, _ in twins}))
    for k, b in twins:
        assert p.stage_lag(k) == p.stage_of_block(b) - p.stage_of_module(k) >= 0
    last = Placement.of([2, 3, 3], 1, modules, ema_only_last=True)
    assert list(last.twins) == [max(twins)]


def test_partition_must_cover_every_module(modules):
    with pytest.raises(AssertionError):
        Placement.of([2, 2], 1, modules)

"""benchmarks/staleness.py: each variant's runs are paired by seed with the single process of
the same plan, and the table says mean ± std of the error and of the paired gap; and the
optimizer groups pipeline.stale_lr / stale_momentum retune are exactly the late bodies'.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_staleness.py -q
"""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from benchmarks import staleness


def _finished(workdir, variant, seed, error):
    d = workdir / staleness.run_name(variant, seed)
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"test_top1_error": error,
                                                "per_module_test_error": [None, error]}))


def test_gaps_are_paired_by_seed_within_a_plan(tmp_path):
    for seed, single, late, single_ref, late_ref in ((0, 20.0, 22.5, 21.0, 21.0),
                                                     (1, 21.0, 22.0, 22.0, 22.5)):
        _finished(tmp_path, "single", seed, single)
        _finished(tmp_path, "async", seed, late)
        _finished(tmp_path, "single:ref", seed, single_ref)
        _finished(tmp_path, "async:ref", seed, late_ref)
    _finished(tmp_path, "window", 0, 21.0)         # one seed only: a gap of one pair
    rows = staleness.report(Namespace(workdir=tmp_path),
                            ["single", "async", "window", "single:ref", "async:ref"], [0, 1])
    assert rows["async"]["gap"]["mean"] == pytest.approx(1.75)
    assert rows["async"]["gap"]["std"] == pytest.approx(0.75 * 2 ** 0.5)
    assert rows["async:ref"]["gap"]["mean"] == pytest.approx(0.25)    # against single:ref
    assert rows["window"]["gap"] == {"mean": pytest.approx(1.0), "std": 0.0, "n": 1}
    assert rows["single"]["gap"] is None and rows["single"]["test_error"]["mean"] == 20.5


# ---- [Note: stale steps]: which optimizer groups pipeline.stale_lr / stale_momentum retune ----
def _stage_groups(flags, emulate=None):
    from pipemlaan.config import load_config
    from pipemlaan.data import DatasetSpec
    from pipemlaan.engine.stage import Stage
    from pipemlaan.local.module import build_local_modules, window_plan
    spec = DatasetSpec("synthetic", 3, (8, 8), 10, (0.0,) * 3, (1.0,) * 3)
    cfg = load_config(None, ["--model.name=resnet8", "--model.K=4", "--method.name=dgl",
                             "--method.mlm=true", "--method.lam=true",
                             "--method.first_modules_head=true", *flags])
    _, mods = build_local_modules(cfg, spec)
    stage = Stage(cfg, mods, window_plan(cfg, len(mods)), torch.device("cpu"), emulate=emulate)
    return {k: [(g["lr_mult"], g["momentum"], g["nesterov"]) for g in opt.param_groups]
            for k, opt in stage.optimizers.items()}


def test_stale_steps_retune_only_the_bodies_whose_update_comes_late():
    retune = ["--pipeline.stale_lr=0.5", "--pipeline.stale_momentum=0.95"]
    plain = _stage_groups([])
    late = _stage_groups(retune, emulate=([2, 2], 2))     # 2 ranks, 2 in flight
    # module 1's window gradient comes from rank 1: its body steps late, and only its body
    assert late[1][0] == (0.5, 0.95, True) and late[1][1:] == plain[1][1:]
    # module 0's windows close on its own rank, and rank 1's modules never wait
    for k in (0, 2, 3):
        assert late[k] == plain[k], k
    assert all(g[1:] == (0.9, True) for groups in plain.values() for g in groups)
    # one in flight: nothing is late, nothing is retuned; nor in a plain single process
    assert _stage_groups(retune, emulate=([2, 2], 1)) == plain
    assert _stage_groups(retune) == plain
    # the default: the late body's learning rate halved, its momentum train's
    default = _stage_groups([], emulate=([2, 2], 2))
    assert default[1][0] == (0.5, 0.9, True) and default[1][1:] == plain[1][1:]
    assert _stage_groups(["--pipeline.stale_lr=1"], emulate=([2, 2], 2)) == plain
    # momentum 0 turns Nesterov off for that group (torch refuses Nesterov without momentum)
    assert _stage_groups(["--pipeline.stale_momentum=0"], emulate=([1, 1, 1, 1], 2))[0][0] \
        == (0.5, 0.0, False)

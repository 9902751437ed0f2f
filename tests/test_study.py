"""The rule by which benchmarks/study.py decides the default MLM plan (lower mean error wins,
unless the two plans are within one standard deviation: then the reference plan stays), and
the per-seed aggregation it applies it to.

Run: .venv/bin/python -m pytest -q tests/test_study.py -p no:cacheprovider
"""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks.study import (SAME_STUDY, aggregate, earlier_runs, merged, plan_decisions,
                              plan_flags)


def _runs(errors: list[float]) -> list[dict]:
    return [{"test_top1_error": e, "seed": k, "per_module_test_error": [None, e],
             "curve": [e + 5, e], "wall_s": 1.0, "images_per_s": 1.0,
             "peak_memory_bytes": [1]} for k, e in enumerate(errors)]


def _decide(ref: list[float], headed: list[float]) -> str:
    (line,) = plan_decisions({"dgl+mlaan:ref": aggregate(_runs(ref)),
                              "dgl+mlaan:headed": aggregate(_runs(headed)), "bp": {}})
    return line


def test_aggregate_keeps_every_seed_and_the_curve():
    r = aggregate(_runs([9.0, 10.0, 11.0]))
    assert r["top1_error_mean"] == pytest.approx(10.0)
    assert r["top1_error_std"] == pytest.approx(1.0)
    assert r["seeds"] == [0, 1, 2] and r["top1_errors"] == [9.0, 10.0, 11.0]
    assert r["curve_mean"] == pytest.approx([15.0, 10.0])
    assert r["per_module_test_error"] == [None, pytest.approx(10.0)]


def test_a_clear_gap_picks_the_better_plan():
    assert "every module headed wins" in _decide([10.0, 10.2, 10.1], [9.0, 9.1, 9.2])
    assert "the reference plan wins" in _decide([9.0, 9.1, 9.2], [10.0, 10.2, 10.1])


def test_within_one_std_the_reference_plan_stays():
    line = _decide([9.0, 10.0, 11.0], [8.5, 9.5, 10.5])     # 0.5 apart, std 1.0
    assert "within one standard deviation: the reference plan stays" in line
    assert "-0.50 points" in line and "3 seeds each" in line


def test_one_seed_decides_nothing():
    assert "undecided" in _decide([10.0], [5.0])


def test_every_run_names_its_plan():
    assert plan_flags("dgl+mlaan:headed")[1][-1] == "--method.first_modules_head=true"
    assert plan_flags("dgl+mlaan")[1][-1] == "--method.first_modules_head=false"
    with pytest.raises(ValueError, match="unknown plan"):
        plan_flags("dgl+mlaan:all")


def _args(**over) -> argparse.Namespace:
    base = {"model": "resnet20", "K": 4, "epochs": 3, "batch": 128, "lr": 0.1,
            "train_subset": 0, "ranks": 1, "set": []}
    return argparse.Namespace(**{**base, **over})


def test_earlier_runs_complete_the_seeds_this_study_did_not_run(tmp_path):
    old = tmp_path / "old.json"
    args = vars(_args())
    del args["set"]             # a study from before --set existed ran without it
    old.write_text(json.dumps({"args": args, "runs": {"infopro": _runs([10.0, 11.0])}}))
    earlier = earlier_runs(old, _args())
    got = merged(_runs([0, 0, 12.0])[2:], earlier["infopro"])      # seed 2, run here
    assert [r["seed"] for r in got] == [0, 1, 2]
    assert [r["test_top1_error"] for r in got] == [10.0, 11.0, 12.0]
    # a seed run here replaces the earlier study's run of that seed
    again = merged(_runs([7.0]), earlier["infopro"])
    assert [r["test_top1_error"] for r in again] == [7.0, 11.0]


@pytest.mark.parametrize("key,value", [("epochs", 1), ("lr", 0.05), ("set", ["train.lr=1"])])
def test_earlier_runs_of_other_settings_are_refused(tmp_path, key, value):
    assert key in SAME_STUDY
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"args": vars(_args()), "runs": {}}))
    with pytest.raises(SystemExit, match=f"other settings.*{key}"):
        earlier_runs(old, _args(**{key: value}))

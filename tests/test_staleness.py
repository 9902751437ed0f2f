"""benchmarks/staleness.py: each variant's runs are paired by seed with the single process of
the same plan, and the table says mean ± std of the error and of the paired gap.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_staleness.py -q
"""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

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

"""Tests of pipemlaan.engine.partition and engine/costs.py: the balanced partition is optimal
and never puts a rank strictly inside a cascade window; impossible requests and bad explicit
partitions raise ConfigError naming the fix; describe() reports every rank; the counted costs
it balances depend on the run (batch, work) and nothing else, so a run on busy cores splits
the model as on an idle machine.

Run: cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_partition.py -q
"""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from pipemlaan.config import load_config
from pipemlaan.engine.costs import count_module_costs, predicted_seconds
from pipemlaan.engine.partition import (balanced_partition, check_partition, describe,
                                        window_spans)
from pipemlaan.errors import ConfigError
from pipemlaan.local.module import window_plan


def spans_of(K: int, W: int, lead: int | None = None) -> list[tuple[int, int]]:
    """Windows of W modules closing at every module from `lead` on, the first reaching back
    to module 0 (the reference plan; lead = W-1 gives windows of W modules throughout)."""
    lead = W - 1 if lead is None else lead
    return [(0 if j == lead else j - W + 1, j) for j in range(lead, K) if W > 1]


def crosses_two(counts: list[int], spans) -> bool:
    """Independent oracle: some window covers modules of three or more ranks."""
    owner = [r for r, n in enumerate(counts) for _ in range(n)]
    return any(len({owner[k] for k in range(a, j + 1)}) > 2 for a, j in spans)


def contiguous_partitions(K: int, ranks: int, spans):
    """Every way to cut K modules into `ranks` contiguous runs none of whose windows crosses
    two rank boundaries."""
    for cuts in itertools.combinations(range(1, K), ranks - 1):
        bounds = (0, *cuts, K)
        counts = [b - a for a, b in zip(bounds, bounds[1:])]
        if not crosses_two(counts, spans):
            yield counts


def bottleneck(counts: list[int], costs: list[float]) -> float:
    out, start = 0.0, 0
    for n in counts:
        out = max(out, sum(costs[start:start + n]))
        start += n
    return out


def random_costs(rng: random.Random, K: int) -> list[float]:
    kind = rng.choice(["uniform", "skewed", "ints", "equal"])
    if kind == "uniform":
        return [rng.uniform(0.001, 1.0) for _ in range(K)]
    if kind == "skewed":
        return [rng.uniform(0.001, 1.0) * 10 ** rng.uniform(-2, 2) for _ in range(K)]
    if kind == "ints":
        return [float(rng.randint(1, 5)) for _ in range(K)]
    return [0.25] * K


CASES = [(K, ranks, W, lead) for K in range(1, 9) for ranks in range(1, 5) for W in (1, 2, 3)
         for lead in {W - 1, W} if ranks <= K and lead < K]


@pytest.mark.parametrize("K,ranks,W,lead", CASES,
                         ids=[f"K{K}-r{r}-W{W}-lead{ld}" for K, r, W, ld in CASES])
def test_balanced_partition_is_optimal(K, ranks, W, lead):
    spans = spans_of(K, W, lead)
    feasible = list(contiguous_partitions(K, ranks, spans))
    rng = random.Random(1000 * K + 10 * ranks + W + 7 * lead)
    for _ in range(10):
        costs = random_costs(rng, K)
        if not feasible:
            with pytest.raises(ConfigError):
                balanced_partition(costs, ranks, spans)
            continue
        got = balanced_partition(costs, ranks, spans)
        assert len(got) == ranks and sum(got) == K, (costs, got)
        assert all(isinstance(n, int) and n >= 1 for n in got), got
        assert not crosses_two(got, spans), (got, spans)
        best = min(bottleneck(p, costs) for p in feasible)
        assert math.isclose(bottleneck(got, costs), best, rel_tol=1e-9, abs_tol=1e-12), \
            (costs, got, best)


def test_balanced_partition_moves_modules_off_an_expensive_stage():
    # one dominant module must sit alone: [2, 1, 3] is the only partition whose slowest stage
    # is the dominant module itself
    assert balanced_partition([0.1, 0.1, 5.0, 0.1, 0.1, 0.1], 3) == [2, 1, 3]


def test_balanced_partition_single_rank_owns_everything():
    assert balanced_partition([0.3, 0.1, 0.2], 1) == [3]


def test_windows_of_three_ask_two_modules_of_every_rank_but_the_first():
    spans = spans_of(6, 3)
    assert balanced_partition([1.0] * 6, 3, spans) in ([2, 2, 2], [1, 2, 3], [1, 3, 2])
    check_partition([1, 2, 3], spans)          # rank 0 is never inside a window
    with pytest.raises(ConfigError, match="rank 1"):
        check_partition([2, 1, 3], spans)


def test_spans_come_from_the_window_plan():
    """The reference plan on resnet8 with the stem alone (K=4, window 2): the first window
    covers modules 0-2, so 4 ranks of one module each would put rank 1 inside it."""
    cfg = load_config(None, ["--model.name=resnet8", "--model.K=4"])
    spans = window_spans(window_plan(cfg, 4))
    assert spans == [(0, 2), (2, 3)]
    with pytest.raises(ConfigError) as info:
        balanced_partition([1.0] * 4, 4, spans)
    assert "model.K=4" in str(info.value) and "\n" not in str(info.value)
    assert balanced_partition([1.0] * 4, 3, spans) == [1, 2, 1] or \
        not crosses_two(balanced_partition([1.0] * 4, 3, spans), spans)


@pytest.mark.parametrize("K,ranks,W", [(3, 4, 2), (5, 4, 3), (1, 2, 2), (3, 3, 3)])
def test_balanced_partition_impossible_raises_config_error(K, ranks, W):
    with pytest.raises(ConfigError) as info:
        balanced_partition([1.0] * K, ranks, spans_of(K, W))
    msg = str(info.value)
    assert "model.K" in msg and str(K) in msg
    assert "\n" not in msg


@pytest.mark.parametrize("counts,W", [([2, 1, 2], 3), ([3, 1, 2], 3), ([1, 1, 1], 3)])
def test_check_partition_rejects_a_rank_inside_a_window(counts, W):
    spans = spans_of(sum(counts), W)
    with pytest.raises(ConfigError) as info:
        check_partition(counts, spans)
    msg = str(info.value)
    assert "pipeline.partition" in msg
    assert crosses_two(counts, spans)
    assert "rank 1" in msg      # the rank that sits inside a window in each of these


@pytest.mark.parametrize("counts,W", [([2, 2, 2], 3), ([1, 3], 2), ([4], 3), ([1, 2, 2], 3)])
def test_check_partition_accepts_valid(counts, W):
    check_partition(counts, spans_of(sum(counts), W))


@pytest.mark.parametrize("counts", [[4], [2, 2], [1, 3], [1, 1, 1, 1], [3, 2, 1, 2]])
def test_describe_mentions_every_rank_and_its_modules(counts):
    K = sum(counts)
    costs = [0.001 * (k + 1) for k in range(K)]
    text = describe(counts, costs)
    assert str(counts) in text
    start = 0
    for r, n in enumerate(counts):
        assert f"rank {r}:" in text
        assert f"modules {start}-{start + n - 1}" in text
        start += n
    assert f"rank {len(counts)}:" not in text


def test_too_many_stages_names_the_nearest_choices():
    """ResNet-8 with the stem alone (K=4) under the reference plan: the first window covers
    modules 0-2, so 4 stages cannot hold it; the error names 3 stages, and for ResNet-14 on 4
    stages the smallest K that works."""
    from pipemlaan.config import load_config
    from pipemlaan.engine.setup import _check_stages_fit
    from pipemlaan.errors import ConfigError
    from pipemlaan.local.module import window_plan

    def message(*overrides: str, stages: int) -> str:
        cfg = load_config(None, ["--data.name=synthetic", *overrides])
        plan = window_plan(cfg, cfg.model.K)
        with pytest.raises(ConfigError) as info:
            _check_stages_fit(cfg, stages, cfg.model.K, window_spans(plan))
        return str(info.value)

    msg = message("--model.name=resnet8", "--model.K=4", stages=4)
    assert "at most 3 stage(s) for this K" in msg and "no model.K of resnet8" in msg, msg
    msg = message("--model.name=resnet14", "--model.K=3", "--method.window=3", stages=3)
    assert "at most 2 stage(s)" in msg and "model.K=4 or more on 3 stages" in msg, msg
    cfg = load_config(None, ["--data.name=synthetic", "--model.name=resnet14", "--model.K=4",
                             "--method.window=3"])
    _check_stages_fit(cfg, 3, 4, window_spans(window_plan(cfg, 4)))      # fits: no error


# ---- counted costs: the partition a command decides ([Note: counted costs]) -----------------
def _modules(*flags: str):
    from pipemlaan.data import dataset_spec
    from pipemlaan.local.module import build_local_modules
    cfg = load_config(None, ["--data.name=synthetic", *flags])
    torch.manual_seed(0)
    _, modules = build_local_modules(cfg, dataset_spec(cfg.data))
    return cfg, modules


def test_counted_costs_are_the_same_whatever_the_threads_and_leave_the_modules_alone():
    cfg, modules = _modules("--model.name=resnet20", "--model.K=4")
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    threads = torch.get_num_threads()
    try:
        first = count_module_costs(modules, (3, 32, 32))
        torch.set_num_threads(1)
        again = count_module_costs(modules, (3, 32, 32))
    finally:
        torch.set_num_threads(threads)
    assert first == again
    assert all(m.training for m in modules)
    for m, saved in zip(modules, before):
        for k, v in m.state_dict().items():      # BN running statistics included
            assert torch.equal(v, saved[k]), k
        assert all(p.grad is None for p in m.parameters())
    # resnet20 K=4 under DGL+MLAAN: the leap heads make the middle modules the dearest
    secs = predicted_seconds(modules, (3, 32, 32), 128, "cpu")
    assert max(secs) in secs[1:3] and all(s > 0 for s in secs)


def test_counted_costs_follow_the_run_batch_and_the_work():
    _, modules = _modules("--model.name=resnet20", "--model.K=4")
    small = predicted_seconds(modules, (3, 32, 32), 32, "cpu")
    big = predicted_seconds(modules, (3, 32, 32), 256, "cpu")
    assert all(b > s for b, s in zip(big, small))
    counts = count_module_costs(modules, (3, 32, 32))
    # a 3x3 convolution of 16 -> 16 channels on a 32x32 map alone is 2.36M multiply-adds
    assert all(c.macs > 2_000_000 and c.elements > 16 * 32 * 32 and c.ops > 3 for c in counts)
    _, dgl = _modules("--model.name=resnet20", "--model.K=4", "--method.mlm=false",
                      "--method.lam=false")
    plain = count_module_costs(dgl, (3, 32, 32))
    # the same bodies without leap heads: less work where MLAAN adds one (modules 1 and 2; the
    # reference plan leaves module 0 without a head, the last one is the classifier's)
    assert all(p.macs < c.macs for p, c in zip(plain[1:-1], counts[1:-1]))
    assert plain[-1] == counts[-1]


@pytest.mark.slow
def test_the_same_command_picks_the_same_partition_with_the_cores_busy(tmp_path):
    """Two processes spin on both cores while a 2-rank run starts: its partition is the one
    the counted costs give on an idle machine (a timed partition moved with the load)."""
    from launching import launch_env, run_to_end, train_cmd, unique_name
    from pipemlaan.engine.partition import window_spans as spans_for
    flags = ["--data.name=synthetic", "--model.name=resnet20", "--model.K=8",
             "--method.first_modules_head=true", "--train.batch_size=64"]
    cfg, modules = _modules(*flags)
    expected = balanced_partition(predicted_seconds(modules, (3, 32, 32), 64, "cpu"), 2,
                                  spans_for(window_plan(cfg, 8)))
    name = unique_name("busy")
    # at the lowest priority: the cores are never idle, yet the suite's other tests go on
    burners = [subprocess.Popen([sys.executable, "-c", "import os\nos.nice(19)\nwhile 1: pass"])
               for _ in range(2)]
    try:
        proc = run_to_end(train_cmd(2, [*flags, "--train.max_steps=1", "--data.test_subset=64",
                                        "--run.progress=false", f"--run.dir={tmp_path}",
                                        f"--run.name={name}"]),
                          tmp_path / "logs", name, env=launch_env())
    finally:
        for b in burners:
            b.kill()
    assert proc.poll() == 0, proc.stderr_text[-2000:]
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["partition"] == expected
    for key in ("predicted_stage_s", "measured_stage_s"):     # beside each other per rank
        assert len(summary[key]) == 2 and all(s > 0 for s in summary[key]), summary[key]

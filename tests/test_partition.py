"""Tests of pipemlaan.engine.partition: the balanced partition is optimal and respects
min_per_rank; impossible requests and bad explicit partitions raise ConfigError naming the fix;
describe() reports every rank.

Run: cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_partition.py -q
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from pipemlaan.engine.partition import balanced_partition, check_partition, describe
from pipemlaan.errors import ConfigError


def contiguous_partitions(K: int, ranks: int, min_per_rank: int):
    """Every way to cut K modules into `ranks` contiguous runs of >= min_per_rank modules."""
    for cuts in itertools.combinations(range(1, K), ranks - 1):
        bounds = (0, *cuts, K)
        counts = [b - a for a, b in zip(bounds, bounds[1:])]
        if min(counts) >= min_per_rank:
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


CASES = [(K, ranks, mpr) for K in range(1, 9) for ranks in range(1, 5) for mpr in (1, 2, 3)
         if ranks * mpr <= K]


@pytest.mark.parametrize("K,ranks,min_per_rank", CASES,
                         ids=[f"K{K}-r{r}-min{m}" for K, r, m in CASES])
def test_balanced_partition_is_optimal(K, ranks, min_per_rank):
    rng = random.Random(1000 * K + 10 * ranks + min_per_rank)
    for _ in range(25):
        costs = random_costs(rng, K)
        got = balanced_partition(costs, ranks, min_per_rank)
        assert len(got) == ranks, (costs, got)
        assert sum(got) == K, (costs, got)
        assert all(isinstance(n, int) for n in got), got
        assert min(got) >= min_per_rank, (costs, got, min_per_rank)
        best = min(bottleneck(p, costs)
                   for p in contiguous_partitions(K, ranks, min_per_rank))
        assert math.isclose(bottleneck(got, costs), best, rel_tol=1e-9, abs_tol=1e-12), \
            (costs, got, best)


def test_balanced_partition_moves_modules_off_an_expensive_stage():
    # one dominant module must sit alone: [2, 1, 3] is the only partition whose slowest stage
    # is the dominant module itself
    assert balanced_partition([0.1, 0.1, 5.0, 0.1, 0.1, 0.1], 3) == [2, 1, 3]


def test_balanced_partition_single_rank_owns_everything():
    assert balanced_partition([0.3, 0.1, 0.2], 1) == [3]


@pytest.mark.parametrize("K,ranks,min_per_rank", [(3, 4, 1), (5, 3, 2), (8, 3, 3), (1, 2, 1),
                                                  (6, 4, 2)])
def test_balanced_partition_impossible_raises_config_error(K, ranks, min_per_rank):
    with pytest.raises(ConfigError) as info:
        balanced_partition([1.0] * K, ranks, min_per_rank)
    msg = str(info.value)
    assert "model.K" in msg and str(K) in msg
    assert "\n" not in msg


@pytest.mark.parametrize("counts,min_per_rank", [([2, 1, 2], 2), ([0, 4], 1), ([3, 1], 2)])
def test_check_partition_rejects_too_small_stage(counts, min_per_rank):
    with pytest.raises(ConfigError) as info:
        check_partition(counts, min_per_rank)
    msg = str(info.value)
    assert "pipeline.partition" in msg
    bad = next(r for r, n in enumerate(counts) if n < min_per_rank)
    assert f"rank {bad}" in msg


@pytest.mark.parametrize("counts,min_per_rank", [([2, 2, 2], 2), ([1, 3], 1), ([4], 3)])
def test_check_partition_accepts_valid(counts, min_per_rank):
    check_partition(counts, min_per_rank)


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

"""Which contiguous run of local modules each rank owns.

The balanced partition minimises the cost of the slowest stage (the pipeline's throughput is
set by it) under the constraint that every cascade window crosses at most one rank boundary:
no rank may sit strictly inside a window, i.e. own modules lo..hi-1 of a window that starts
before lo and ends at or after hi (the rank would have to pass that window's gradient on
within the step it produced it). With windows of W modules this asks W-1 modules of every
rank but the first; the reference plan's wider first window asks more of the second rank
only. The costs a run balances are counted, not timed (engine/costs.py [Note: counted
costs]): every rank computes the same ones, so the same command always splits the model the
same way. `measure_costs` times modules for the benchmarks that check those counts
(benchmarks/partition_fit.py) and for the BP baselines.
"""

from __future__ import annotations

import time

import torch

from pipemlaan.errors import ConfigError
from pipemlaan.local.module import LocalModule

Span = tuple[int, int]     # a window's first and last module (inclusive)


def window_spans(plan) -> list[Span]:
    """The modules each window of a WindowPlan trains."""
    return [(j - r + 1, j) for j, r in enumerate(plan.reach) if r > 1]


def inside(lo: int, hi: int, spans: list[Span]) -> Span | None:
    """A window that rank [lo, hi) would sit strictly inside, or None."""
    return next(((a, j) for a, j in spans if a < lo and j >= hi), None)


def balanced_partition(costs: list[float], ranks: int, spans: list[Span] = ()) -> list[int]:
    """Module counts per rank minimising the largest stage cost (exact dynamic programme)."""
    K = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    INF = float("inf")
    # best[r][k]: minimal bottleneck for the first k modules on r ranks
    best = [[INF] * (K + 1) for _ in range(ranks + 1)]
    cut = [[0] * (K + 1) for _ in range(ranks + 1)]
    best[0][0] = 0.0
    for r in range(1, ranks + 1):
        for k in range(r, K + 1):
            for j in range(r - 1, k):
                if best[r - 1][j] == INF or inside(j, k, spans):
                    continue
                v = max(best[r - 1][j], prefix[k] - prefix[j])
                if v < best[r][k] - 1e-12:
                    best[r][k], cut[r][k] = v, j
    if best[ranks][K] == INF:
        widest = max((j - a + 1 for a, j in spans), default=1)
        raise ConfigError(f"{ranks} ranks cannot hold model.K={K} local modules so that every "
                          f"cascade window (the widest covers {widest} modules) crosses at "
                          f"most one rank boundary; use fewer ranks, a smaller window or a "
                          f"larger K")
    counts, k = [], K
    for r in range(ranks, 0, -1):
        j = cut[r][k]
        counts.append(k - j)
        k = j
    return counts[::-1]


def feasible(K: int, ranks: int, spans: list[Span]) -> bool:
    """Can `ranks` ranks hold K modules with no rank strictly inside a window?"""
    try:
        balanced_partition([1.0] * K, ranks, spans)
    except ConfigError:
        return False
    return True


def check_partition(counts: list[int], spans: list[Span], key: str = "pipeline.partition"
                    ) -> None:
    for r in range(len(counts)):
        lo, hi = stage_bounds(counts, r)
        bad = inside(lo, hi, spans)
        if bad:
            raise ConfigError(f"{key}={counts} puts rank {r}'s modules {lo}-{hi - 1} inside "
                              f"the cascade window of modules {bad[0]}-{bad[1]}, which would "
                              f"then cross two rank boundaries; give rank {r} more modules or "
                              f"lower method.window")


def measure_costs(modules: list[LocalModule], example: torch.Tensor, labels: torch.Tensor,
                  repeats: int = 2) -> list[float]:
    """Seconds of one training pass per module (median of `repeats`, after one warm-up).
    Weights, BN statistics and gradients are restored afterwards, so profiling never changes
    the run."""
    costs, x = [], example
    for mod in modules:
        saved = {k: v.clone() for k, v in mod.state_dict().items()}
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            inp = x.detach().requires_grad_(True)
            out = mod.body(inp)
            loss = out.float().mean()
            for head in (mod.g, mod.h):
                if head is not None:
                    loss = loss + head(out, labels, example)[0]
            loss.backward()
            if out.is_cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
        mod.zero_grad(set_to_none=True)
        mod.load_state_dict(saved)
        costs.append(sorted(times)[len(times) // 2])
        x = out.detach()
    return costs


def stage_bounds(counts: list[int], stage: int) -> tuple[int, int]:
    """[lo, hi): the indices of the modules (or blocks) stage `stage` owns."""
    lo = sum(counts[:stage])
    return lo, lo + counts[stage]


def describe(counts: list[int], costs: list[float]) -> str:
    lines, stage_costs = [], []
    for r in range(len(counts)):
        lo, hi = stage_bounds(counts, r)
        c = sum(costs[lo:hi])
        stage_costs.append(c)
        lines.append(f"  rank {r}: modules {lo}-{hi - 1} ({c * 1e3:.1f} ms/step)")
    balance = (sum(stage_costs) / len(stage_costs)) / max(stage_costs)
    return ("partition " + str(counts) + f", predicted balance {balance:.0%} "
            "(mean stage / slowest stage)\n" + "\n".join(lines))

"""Where everything lives: which stage owns each local module and backbone block, the grid of
ranks (D replicas x S stages), and which EMA twins move and which block each follows.

Built once at start-up (engine/setup.py) from the partition and the modules, and handed to the
schedule (which messages cross which boundary), LAM (who publishes which block to whom), the
replica groups and the profiler, so no other file works placement out again.

Rank layout: rank = replica * S + stage, so each replica's stages sit on consecutive ranks (one
node holds whole pipelines when S divides its GPU count; only the replicas' gradient
all-reduces cross nodes).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    partition: tuple[int, ...]            # modules per stage, the same in every replica
    replicas: int
    blocks: tuple[tuple[int, int], ...]   # each module's first and last backbone block
    twins: tuple[tuple[int, int], ...]    # (module, the block its EMA twin follows), moving ones

    @classmethod
    def of(cls, partition, replicas: int, modules, ema_only_last: bool = False) -> "Placement":
        """From module counts per stage and the LocalModules. `ema_only_last`: only the last
        module's twin moves (method.ema_only_last, the reference CIFAR code)."""
        twins = [(m.index, m.twin_source) for m in modules if m.twin_source is not None]
        if ema_only_last and twins:
            twins = [max(twins)]
        return cls(tuple(partition), replicas, tuple(tuple(m.block_range) for m in modules),
                   tuple(twins))

    def __post_init__(self):
        assert sum(self.partition) == len(self.blocks), "the partition must cover every module"
        object.__setattr__(self, "_ends", list(itertools.accumulate(self.partition)))

    # ---- the grid -----------------------------------------------------------------------------
    @property
    def stages(self) -> int:
        return len(self.partition)

    @property
    def world(self) -> int:
        return self.stages * self.replicas

    def rank_of(self, replica: int, stage: int) -> int:
        return replica * self.stages + stage

    def seat(self, rank: int) -> tuple[int, int]:
        """(replica, stage) of a rank."""
        return divmod(rank, self.stages)

    # ---- modules and blocks ---------------------------------------------------------------
    def modules_of(self, stage: int) -> range:
        hi = self._ends[stage]
        return range(hi - self.partition[stage], hi)

    def stage_of_module(self, k: int) -> int:
        return bisect.bisect_right(self._ends, k)

    def last_module_of_stage(self, k: int) -> int:
        """The last module of the stage that holds module k."""
        return self._ends[self.stage_of_module(k)] - 1

    def stage_of_block(self, b: int) -> int:
        return self.stage_of_module(next(k for k, (lo, hi) in enumerate(self.blocks)
                                         if lo <= b <= hi))

    def owner(self, block: int, replica: int) -> int:
        """The rank of `replica` that holds backbone block `block`."""
        return self.rank_of(replica, self.stage_of_block(block))

    # ---- LAM --------------------------------------------------------------------------------
    @property
    def lam_flows(self) -> tuple[tuple[int, int], ...]:
        """(owner stage, receiver stage) pairs along which live block weights travel to the
        twins that follow them, within each replica."""
        return tuple(sorted({(self.stage_of_block(b), self.stage_of_module(m))
                             for m, b in self.twins
                             if self.stage_of_block(b) != self.stage_of_module(m)}))

    @property
    def twin_stages(self) -> tuple[int, ...]:
        """Stages holding a twin that moves (they take an EMA step at every step)."""
        return tuple(sorted({self.stage_of_module(m) for m, _ in self.twins}))

    def stage_lag(self, module: int) -> int:
        """Stages between a twin's module and the block it follows."""
        block = dict(self.twins)[module]
        return self.stage_of_block(block) - self.stage_of_module(module)

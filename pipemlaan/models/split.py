"""Where the backbone is cut into K local modules, and which downstream blocks each LAM copies.

Numbering follows the paper: K counts the stem as a module of its own when K = blocks + 1
(ResNet-32 K=16, ResNet-110 K=55, ResNet-34 K=17, ResNet-101 K=34, ResNet-152 K=51: one
block per module). For any smaller K the stem is merged into the first module, as in the
reference code; the reference code's split points are used where it has them
(reference_tables.json), and otherwise the **even rule**: the residual blocks are divided
into K contiguous runs whose sizes differ by at most one, the longer runs at the end (the
first module also carries the stem). The even rule reproduces every ResNet-32 entry of the
reference tables.

LAM copies (module i's leap network) come from the reference tables where they exist. The
**general rule** otherwise: the first block of every stage that starts after module i ends,
then the network's last block; the first copied block is the one with the EMA twin. Because
a stage's first block takes the previous stage's channels, the copies always chain. A
backbone of one stage (a ViT's encoder layers, any network whose blocks keep their shape)
has no stage boundary downstream: its leap network is the **next block** (with the EMA twin)
and the network's last block, so LAM copies "the following layers" of a transformer at the
cost of at most two blocks.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from pipemlaan.errors import ConfigError
from pipemlaan.models.resnet import Backbone

Range = tuple[int, int]  # inclusive [first, last] indices into Backbone.blocks


@lru_cache(maxsize=1)
def reference_tables() -> dict:
    return json.loads(resources.files("pipemlaan.models").joinpath(
        "reference_tables.json").read_text())


def module_ranges(backbone: Backbone, K: int) -> list[Range]:
    """The K contiguous block ranges of the local modules (stem = block 0)."""
    n = backbone.num_blocks
    if K < 1 or K > n + 1:
        raise ConfigError(f"model.K={K} is impossible for {backbone.name}: it has {n} residual "
                          f"blocks, so K must lie in 1..{n + 1} (K={n + 1} = stem + one block "
                          f"per module)")
    if K == n + 1:
        return [(i, i) for i in range(n + 1)]
    table = reference_tables()["module_end_blocks"].get(backbone.name, {}).get(str(K))
    if table:
        ends = [backbone.flat_index(s, b) for s, b in table]
    else:
        base, extra = divmod(n, K)
        sizes = [base + (1 if i >= K - extra else 0) for i in range(K)]
        ends, total = [], 0
        for s in sizes:
            total += s
            ends.append(total)
    starts = [0] + [e + 1 for e in ends[:-1]]
    return list(zip(starts, ends))


def lam_copies(backbone: Backbone, ranges: list[Range], i: int) -> list[int]:
    """Block indices whose deep copies form module i's leap network (first one: EMA twin)."""
    K = len(ranges)
    if i >= K - 1:
        return []
    n = backbone.num_blocks
    tables = reference_tables()["lam_copied_blocks"].get(backbone.name, {})
    stem_alone = K == n + 1
    entry = None
    if stem_alone and i == 0:
        pass     # the reference has no leap network on the stem: the general rule below
    elif stem_alone and str(n) in tables:
        entry = tables[str(n)][i - 1]   # code module c = paper module c + 1
    elif not stem_alone and str(K) in tables:
        entry = tables[str(K)][i]
    if entry is not None:
        return [backbone.flat_index(s, b) for s, b in entry]
    end = ranges[i][1]
    if len(backbone.stage_sizes) == 1:
        return sorted({end + 1, n})
    firsts = [backbone.flat_index(s + 1, 0) for s in range(len(backbone.stage_sizes))]
    copies = [f for f in firsts if f > end and f != n]
    return copies + [n]

"""The method settings the benchmarks compare, written the way pipemlaan labels them
(`config.method_label`): bp, dgl, dgl+mlm, dgl+lam, dgl+mlaan, infopro, infopro+mlaan, ...
"""

from __future__ import annotations

STUDY = ("bp", "dgl", "dgl+mlm", "dgl+lam", "dgl+mlaan", "infopro", "infopro+mlaan")
_EXTRAS = {"": (False, False), "mlm": (True, False), "lam": (False, True),
           "mlaan": (True, True)}


def parse(label: str) -> tuple[str, bool, bool]:
    """'dgl+mlaan' -> ('dgl', mlm=True, lam=True)."""
    name, _, extra = label.partition("+")
    if extra not in _EXTRAS:
        raise ValueError(f"unknown method {label!r}: write NAME, NAME+mlm, NAME+lam or NAME+mlaan")
    return (name, *_EXTRAS[extra])


def flags(label: str) -> list[str]:
    """The `python -m pipemlaan.train` overrides that select this method."""
    name, mlm, lam = parse(label)
    return [f"--method.name={name}", f"--method.mlm={str(mlm).lower()}",
            f"--method.lam={str(lam).lower()}"]

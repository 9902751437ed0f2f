"""pytest set-up for tests/: puts this folder (and the repository root) on sys.path, and
shares the in-process pipeline runs across test modules.

The test modules import helpers that live next to them and are not test modules themselves:
launching.py (interpreter, torchrun, launch environment), inprocess.py (a whole pipeline in one
process, one thread per rank) and runs.py (the tiny runs and the checks the pipeline tests
share); test_profile.py imports the repository's benchmarks/ package. With both folders on
sys.path these imports work however pytest is started: `python -m pytest` or plain `pytest`,
from the repository root, from tests/ or from any other folder, with any --import-mode.

`inprocess_runs` (session fixture): tiny training runs by key (runs.py), each run once per
session with a thread per rank in one process, whichever test module asks first
(test_inprocess.py, test_pipeline.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
for _folder in (str(_TESTS.parent), str(_TESTS)):      # tests/ ends up first
    if _folder not in sys.path:
        sys.path.insert(0, _folder)


# Modules whose tests start processes (torchrun, the CLI) or train whole pipelines: marked slow,
# so `make test-fast` (pytest -m "not slow") keeps the pure-logic tests, under a minute.
SLOW_MODULES = {"test_pipeline", "test_inprocess", "test_faults", "test_preempt", "test_order",
                "test_multinode", "test_soak", "test_pipelining_bp", "test_host_staging",
                "test_compile", "test_cka", "test_no_host_sync"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def inprocess_runs(tmp_path_factory):
    from runs import InProcessRuns
    runs = InProcessRuns(tmp_path_factory.mktemp("inprocess-runs"))
    yield runs
    runs.close_pool()

"""What the tests that start real training processes share: the interpreter and torchrun of the
project's .venv (or of the running Python), and a clean environment for a launch.

Not a test module; imported by test_pipeline, test_faults, test_soak and test_pipelining_bp.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(_VENV_BIN / "python") if (_VENV_BIN / "python").exists() else sys.executable
TORCHRUN = (str(_VENV_BIN / "torchrun") if (_VENV_BIN / "torchrun").exists()
            else str(Path(sys.executable).with_name("torchrun")))

# set by torchrun for its workers: a test run from inside one must not hand them on
_INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              "MASTER_ADDR", "MASTER_PORT")


def launch_env(**extra: str) -> dict[str, str]:
    """This process's environment without torchrun's per-worker variables, one thread per
    rank, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in _INHERITED and not k.startswith("TORCHELASTIC_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env

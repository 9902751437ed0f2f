"""Entry point: `python -m pipemlaan.train --config configs/X.toml [--section.key=value ...]`.

Runs alone (one process owns every local module) or under torchrun, one pipeline stage per
rank: `torchrun --nproc_per_node=4 -m pipemlaan.train --config configs/X.toml`.
A configuration or data problem prints one line naming the fix and exits with status 2; a
failure of the pipeline (a dead or stalled peer) exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipemlaan.config import describe, load_config
from pipemlaan.errors import ConfigError, DataError, PipemlaanError


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m pipemlaan.train",
        description="Train a ResNet with MLAAN local learning, alone or pipelined under torchrun.",
        epilog="Any config key can be overridden as --section.key=value, e.g. --train.epochs=2.")
    parser.add_argument("--config", help="TOML file (see configs/)")
    parser.add_argument("--help-config", action="store_true", help="print every config key")
    return parser.parse_known_args(argv)


def _fail(message: str, code: int) -> int:
    # one write per line, so lines of several ranks sharing a terminal never interleave
    sys.stderr.write(f"pipemlaan: error: {message}\n")
    sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print(describe())
        return 0
    from pipemlaan.engine.distributed import cleanup, init_distributed
    env, finished = None, False
    try:
        cfg = load_config(args.config, overrides)
        env = init_distributed(cfg)
        from pipemlaan.engine.trainer import Trainer
        trainer = Trainer(cfg, env)
        try:
            trainer.train()
            finished = True
        finally:
            trainer.close()
    except (ConfigError, DataError) as e:
        return _fail(str(e), 2)
    except PipemlaanError as e:
        return _fail(str(e), 1)
    except OSError as e:
        return _fail(f"cannot write {e.filename or 'the run directory'} ({e.strerror}); free "
                     f"disk space or choose another --run.dir", 1)
    finally:
        if env is not None:
            cleanup(env, finished)
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo's worker threads may still be releasing the last collective's buffers, which
        # needs the interpreter; a normal interpreter shutdown then aborts the process
        # (SIGABRT) after a successful run. Everything is written and flushed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

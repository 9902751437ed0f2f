"""Entry point: `python -m pipemlaan.train --config configs/X.toml [--section.key=value ...]`.

Runs alone (one process owns every local module) or under torchrun, one pipeline stage per
rank: `torchrun --nproc_per_node=4 -m pipemlaan.train --config configs/X.toml`.
A configuration or data problem prints one line naming the fix and exits with status 2; a
failure of the pipeline (a dead or stalled peer) exits with status 1; a run stopped by SIGTERM
or SIGUSR1 (a preempted job) ends every rank at an agreed step with a checkpoint and exits with
status 75, resumable with --run.resume=true (engine/preempt.py).
`--help-config` prints every config key; `--help-config --markdown` prints docs/config.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipemlaan.config import describe, load_config
from pipemlaan.engine.distributed import cleanup, init_distributed
from pipemlaan.engine.preempt import PREEMPTED_EXIT, StopRequest, install
from pipemlaan.engine.trainer import Trainer
from pipemlaan.errors import ConfigError, DataError, PipemlaanError


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m pipemlaan.train",
        description="Train a ResNet with MLAAN local learning, alone or pipelined under torchrun.",
        epilog="Any config key can be overridden as --section.key=value, e.g. --train.epochs=2.")
    parser.add_argument("--config", help="TOML file (see configs/)")
    parser.add_argument("--help-config", action="store_true", help="print every config key")
    parser.add_argument("--markdown", action="store_true",
                        help=f"with --help-config: print docs/config.md ({REGENERATE_CONFIG_DOC})")
    args, overrides = parser.parse_known_args(argv)
    if args.markdown and not args.help_config:
        parser.error("--markdown goes with --help-config")
    return args, overrides


REGENERATE_CONFIG_DOC = "python -m pipemlaan.train --help-config --markdown > docs/config.md"


def config_reference_markdown() -> str:
    """docs/config.md: the config reference generated from the fields of pipemlaan/config.py."""
    return (f"# Config reference\n\n"
            f"Generated from the fields' help in `pipemlaan/config.py` by "
            f"`{REGENERATE_CONFIG_DOC}`; edit those, not this file.\n\n"
            f"{describe(level=2).rstrip()}")     # print() ends the file with one newline


def _fail(message: str, code: int) -> int:
    # one write per line, so lines of several ranks sharing a terminal never interleave
    sys.stderr.write(f"pipemlaan: error: {message}\n")
    sys.stderr.flush()
    return code


_TRACED: list = []


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print(config_reference_markdown() if args.markdown else describe())
        return 0
    env, stop = None, StopRequest()
    try:
        cfg = load_config(args.config, overrides)
        env = init_distributed(cfg)
        install(stop, env.rank)
        trainer = Trainer(cfg, env, stop)
        if cfg.run.profile_steps:
            # never freed: freeing a traced trainer (its process groups, whose threads then
            # exit) aborted one run in six (torch 2.14, CPU, gloo: "tcache_thread_shutdown():
            # unaligned tcache chunk detected"); a distributed process ends with os._exit
            _TRACED.append(trainer)
        try:
            trainer.train()
        finally:
            trainer.close()
        if trainer.preempted:
            if env.rank == 0:
                sys.stderr.write(
                    f"pipemlaan: preempted ({stop.reason or 'by another rank'}) when "
                    f"{trainer.step} steps were done, with a checkpoint there: run the same "
                    f"command with --run.resume=true to go on\n")
            return PREEMPTED_EXIT
    except (ConfigError, DataError) as e:
        return _fail(str(e), 2)
    except PipemlaanError as e:
        return _fail(str(e), 1)
    except OSError as e:
        return _fail(f"cannot write {e.filename or 'the run directory'} ({e.strerror}); free "
                     f"disk space or choose another --run.dir", 1)
    finally:
        if env is not None:
            cleanup(env)
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

"""What both launchers share: the argument parser with the generated config reference, and the run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from vlbert_ds.train.checkpoint import CheckpointDiskFull
from vlbert_ds.train.config import RunConfig, config_help, load_config
from vlbert_ds.train.distributed import DistEnv, discover, exit_fast_on_error, init_distributed, setup_process
from vlbert_ds.train.preemption import exit_code_after_stop
from vlbert_ds.train.trainer import RunResult


def parser_for(kind: type[RunConfig], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=kind.command, description=description, epilog=config_help(kind),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or TOML run config")
    parser.add_argument("overrides", nargs="*", help="section.key=value (the keys are listed below)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides, validated) and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser


def load_or_exit(kind: type[RunConfig], path: str | None, overrides: list[str]) -> RunConfig | int:
    """The resolved config, or the exit code 2 after printing why it is refused."""
    try:
        return load_config(path, overrides, kind)
    except (ValueError, FileNotFoundError) as err:
        print(f"{kind.command}: {err}", file=sys.stderr)
        return 2


def launch(config: RunConfig, train: Callable[[DistEnv], RunResult],
           summary: Callable[[RunResult], None]) -> int:
    """Join the process group, train, and turn the outcome into the exit code."""
    dist = discover()
    setup_process(dist)
    init_distributed(dist, timeout_s=config.train.dist_timeout_s)
    print(dist.describe(), flush=True)
    try:
        with exit_fast_on_error(dist):
            result = train(dist)
    except (ValueError, FileNotFoundError) as err:  # bad input, a busy run folder
        print(f"{config.command}: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # diverged: stopped without writing a non-finite checkpoint
        print(f"{config.command}: {err}", file=sys.stderr)
        return 3
    except CheckpointDiskFull as err:
        print(f"{config.command}: {err.strerror}", file=sys.stderr)
        return 4
    if result.preempted:
        return exit_code_after_stop(dist.is_main, result.stop_signal)
    if dist.is_main:
        summary(result)
    return 0

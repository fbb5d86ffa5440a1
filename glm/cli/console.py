"""What a command prints, besides its results: its own lines, progress bars, and how loud PaddleNLP is.

The command's own lines go to stderr on the main process whatever the log level. PaddleNLP's log lines
(loading, the tokenizer's vocabulary, per-step logs: `--log_level info`; the argument dump: `debug`) are
hidden by default, as are colour codes and cursor movement when stderr is a file rather than a terminal.
"""

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List

from paddlenlp.utils.log import logger
from tqdm import tqdm

from ..errors import UserError

__all__ = ["LOG_LEVELS", "ConsoleArguments", "configure_logging", "DropLogMessage", "shown", "say", "progress_bar"]

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ConsoleArguments:
    # PaddleNLP 2.8.1's TrainingArguments resets its log_level fields to -1 and has no such flags: ours.
    log_level: str = field(
        default="warning",
        metadata={"help": "PaddleNLP's log lines on the main process: debug (adds the argument dump), info "
                          "(loading, vocabulary, per-step logs), warning (only warnings besides the run's own "
                          "summary and progress bars) or error."},
    )
    log_level_replica: str = field(
        default="warning", metadata={"help": "The same for the other processes of paddle.distributed.launch."}
    )


def configure_logging(argv: List[str]):
    """Sets PaddleNLP's log level from the --log_level flags in `argv`, before the rest is parsed (parsing
    the Trainer's arguments logs already). The main process is rank 0 of paddle.distributed.launch."""
    parser = argparse.ArgumentParser(add_help=False)
    for name, default in vars(ConsoleArguments()).items():
        parser.add_argument(f"--{name}", default=default)
    console_args = parser.parse_known_args(argv)[0]
    main_process = os.environ.get("PADDLE_TRAINER_ID", "0") == "0"
    level = console_args.log_level if main_process else console_args.log_level_replica
    if level.lower() not in LOG_LEVELS:
        raise UserError(f"--log_level/--log_level_replica must be one of {', '.join(LOG_LEVELS)}; got {level}")
    logger.set_level(level.upper())
    if not sys.stderr.isatty():  # a log file: no colour escape codes
        logger.handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)8s] - %(message)s"))


class DropLogMessage(logging.Filter):
    """Drops PaddleNLP log records that start with `prefix` (one line we know to be misleading)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        return not record.getMessage().startswith(self.prefix)


def shown(path: str) -> str:
    """A path as the user would type it: relative when under the working directory."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def say(text: str = ""):
    """A line of the command's own console (callers print on the main process only)."""
    print(text, file=sys.stderr, flush=True)


def progress_bar(total: int, desc: str, unit: str, disable: bool = False, initial: int = 0,
                 seconds_per_unit: bool = False) -> tqdm:
    """tqdm on stderr (`initial`: units done before, by a run this one resumes). On a file instead of a
    terminal every bar stays on its line (no cursor-up escapes from nested bars) and is redrawn at most
    every 30 s, so a log file holds a few lines per bar. `seconds_per_unit` always shows the rate as
    s/unit (tqdm switches between unit/s and s/unit as the rate crosses 1, which reads as a jump)."""
    terminal = sys.stderr.isatty()
    rate = "{rate_inv_fmt}" if seconds_per_unit else "{rate_fmt}"
    return tqdm(
        total=total, desc=desc, unit=unit, disable=disable, initial=initial, file=sys.stderr, dynamic_ncols=terminal,
        mininterval=0.1 if terminal else 30, maxinterval=10 if terminal else 60, position=None if terminal else 0,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, " + rate + "{postfix}]",
    )

"""Reading a command line into argument dataclasses (PaddleNLP's PdArgumentParser), the same way in every
entry script: PaddleNLP's log level set first (parsing logs already), help with the defaults that mean
something, a bad flag or value as one line (a UserError), and the flags the user gave remembered.

Training scripts read `RECIPE.json [--flag value ...]` (`command_line`): a recipe first, flags after it
overriding it; or flags alone on top of the task's embedded default recipe.
"""

import argparse
import os
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Sequence

from paddlenlp.trainer import PdArgumentParser

from ..errors import UserError
from .console import ConsoleArguments, configure_logging

__all__ = ["HelpFormatter", "flag_names", "parser_for", "parse_flags", "CommandLine", "command_line"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """PdArgumentParser's help with '(default: X)' only where X says something: not after a None, whose
    meaning the help text itself gives (it would read '(default: ...). (default: None)')."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def flag_names(argv: Sequence[str]) -> FrozenSet[str]:
    """The names (without dashes) of the flags in `argv`."""
    return frozenset(arg[2:].split("=")[0] for arg in argv if arg.startswith("--"))


def parser_for(dataclass_types: Sequence[type], description: Optional[str] = None) -> PdArgumentParser:
    """A parser of `dataclass_types` and the log-level flags (ConsoleArguments, last, unless among them)."""
    extra = () if ConsoleArguments in dataclass_types else (ConsoleArguments,)
    return PdArgumentParser(tuple(dataclass_types) + extra, formatter_class=HelpFormatter, description=description)


def parse_flags(dataclass_types: Sequence[type], argv: List[str], description: Optional[str] = None) -> tuple:
    """One instance per dataclass from flags alone (no recipe file), after setting the log level; an unknown
    flag or a bad value is a UserError."""
    configure_logging(argv)
    try:
        parsed = parser_for(dataclass_types, description).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:  # unknown flags, bad values
        raise UserError(str(error).splitlines()[0]) from None
    return tuple(parsed[: len(dataclass_types)])


@dataclass
class CommandLine:
    """What a training command line asks for: the recipe it runs (None: the built-in defaults, when a model
    is named without one), the flags the user typed, and everything to parse, in order."""

    recipe: Optional[str]
    user_flags: List[str]
    argv: List[str]

    @property
    def given(self) -> FrozenSet[str]:
        return flag_names(self.user_flags)


def command_line(argv: Sequence[str], default_argv: Sequence[str], parser: PdArgumentParser) -> CommandLine:
    """`RECIPE.json [--flag value ...]`, or flags alone. Flags alone without --model_name_or_path override
    `default_argv` (the embedded default recipe, then its own flags such as its output dir): every flag,
    the tiny model and its lengths stay together. With --model_name_or_path and no recipe, the parser's
    defaults apply."""
    given = list(argv)
    if given and given[0].endswith(".json"):
        recipe, user_flags, flags = given[0], given[1:], given[1:]
        if not os.path.isfile(recipe):
            raise UserError(f"{recipe}: no such recipe file")
    elif "model_name_or_path" in flag_names(given):
        recipe, user_flags, flags = None, given, given
    else:
        recipe, user_flags, flags = default_argv[0], given, list(default_argv[1:]) + given
    return CommandLine(recipe, user_flags, (parser.read_json(recipe) if recipe else []) + flags)

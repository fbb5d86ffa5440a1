"""Reading a command line into argument dataclasses (PaddleNLP's PdArgumentParser), the same way in every
entry script: PaddleNLP's log level set first (parsing logs already), help with the defaults that mean
something, a bad flag or value as one line (a UserError, naming the flag meant when one was mistyped), no
abbreviated flags (argparse would take `--max_step` for `--max_steps` without a word), and the flags the
user gave remembered. Tools with plain argparse flags use `ArgumentParser`, which behaves the same.

Training scripts read `RECIPE.json [--flag value ...]` (`command_line`): a recipe first, flags after it
overriding it; or flags alone on top of the task's embedded default recipe.
"""

import argparse
import dataclasses
import difflib
import json
import os
import textwrap
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Sequence

from paddlenlp.trainer import PdArgumentParser

from ..errors import UserError
from .console import ConsoleArguments, configure_logging

__all__ = [
    "HelpFormatter", "ArgumentParser", "FlagParser", "switch", "flag_names", "parser_for", "parse_flags",
    "CommandLine", "command_line",
]  # fmt: skip


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """PdArgumentParser's help with '(default: X)' only where X says something: not after a None, whose
    meaning the help text itself gives (it would read '(default: ...). (default: None)'); a flag a recipe
    sets shows the recipe's value first (FlagParser.show_recipe)."""

    def _split_lines(self, text, width):  # never inside a name such as tiny-default.json or glm-large-chinese
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _get_help_string(self, action):
        recipe = getattr(action, "recipe_value", None)
        if recipe is not None:
            name, value = recipe
            built_in = "" if action.default in (None, value) else f"; built-in: {action.default}"
            return f"{action.help or ''} ({name}: {value}{built_in})".replace("%", "%%")
        return action.help if action.default is None else super()._get_help_string(action)


class _OneLine:
    """argparse's errors as one UserError line (no usage text), no abbreviated flags, and a flag nobody
    defined refused with the flag that was probably meant."""

    def error(self, message):
        raise UserError(message)

    def parse_known_args(self, args=None, namespace=None):
        namespace, remaining = super().parse_known_args(args, namespace)
        if remaining:
            raise UserError(self.unknown(remaining))
        return namespace, remaining

    def unknown(self, remaining: List[str]) -> str:
        known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        said, after_flag = [], False
        for arg in remaining:
            if not arg.startswith("-"):
                if not after_flag:  # else: the value of the unknown flag before it
                    said.append(f"unexpected argument {arg!r}")
                continue
            after_flag = True
            flag = arg.split("=")[0]
            meant = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
            said.append(f"unknown flag {flag}" + (f" (did you mean {meant[0]}?)" if meant else ""))
        return "; ".join(dict.fromkeys(said)) + " (--help lists the flags)"


class ArgumentParser(_OneLine, argparse.ArgumentParser):
    """argparse for the tools' plain flags, with the entry scripts' one-line errors and no abbreviations."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_own(self, args):
        """(namespace, the arguments that are not this parser's): for a tool that hands the rest on."""
        return argparse.ArgumentParser.parse_known_args(self, args)


# PaddleNLP's TrainingArguments (about 190 flags) that runs of this toolkit set: --help describes these
# and those a recipe sets, and names the others in one paragraph (--help_all describes every one).
TRAINING_FLAGS_SHOWN = frozenset({
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "per_device_train_batch_size",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "num_train_epochs", "max_steps", "lr_scheduler_type",
    "warmup_ratio", "warmup_steps", "logging_steps", "save_steps", "save_total_limit", "evaluation_strategy",
    "eval_steps", "seed", "fp16", "bf16", "fp16_opt_level", "recompute", "sharding", "sharding_parallel_degree",
    "tensor_parallel_degree", "device", "disable_tqdm", "report_to", "dataloader_num_workers",
})  # fmt: skip


# Where this toolkit gives a flag another meaning than the help PdArgumentParser writes for it.
HELP_TEXTS = {
    "--overwrite_output_dir": "Start afresh: the earlier run in --output_dir (its checkpoints and record) is removed "
                              "once this run is known to start. Without it a rerun continues the run there, from its "
                              "last checkpoint.",
    "--no_select_topk": "Beam candidates sampled in proportion to their probabilities (--select_topk false).",
}


class FlagParser(_OneLine, PdArgumentParser):
    """PdArgumentParser (flags from dataclasses) with one-line errors and no abbreviations, and a help that
    a reader can take in: a short usage line, the flags grouped by dataclass (this toolkit's first, as
    given), and of PaddleNLP's TrainingArguments only those its runs set (TRAINING_FLAGS_SHOWN) described."""

    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("usage", "%(prog)s [--flag value ...]")
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)
        for action in self._actions:
            for option in action.option_strings:
                action.help = HELP_TEXTS.get(option, action.help)
        self._group_by_dataclass(dataclass_types)

    def _group_by_dataclass(self, dataclass_types):
        owner = {f.name: dtype for dtype in dataclass_types for f in dataclasses.fields(dtype)}
        groups, self._named_only = {}, []
        for action in list(self._optionals._group_actions):
            dtype = owner.get(action.dest)
            if dtype is None:
                continue  # -h
            if dtype not in groups:
                paddlenlp = dtype.__module__.startswith("paddlenlp")
                groups[dtype] = self.add_argument_group(f"{dtype.__name__}" + (" (PaddleNLP's)" if paddlenlp else ""))
            self._optionals._group_actions.remove(action)
            groups[dtype]._group_actions.append(action)
            if dtype.__name__ == "TrainingArguments" and action.dest not in TRAINING_FLAGS_SHOWN:
                self._named_only.append(action)
        self._name_the_rest()

    def show_recipe(self, recipe: str):
        """Flags `recipe` (a JSON file) sets show its value beside the built-in one, and are described."""
        with open(recipe, encoding="utf-8") as f:
            values = json.load(f)
        for action in self._actions:
            if action.dest in values:
                action.recipe_value = (os.path.basename(recipe), values[action.dest])
        self._named_only = [action for action in self._named_only if action.dest not in values]
        self._name_the_rest()

    def _name_the_rest(self):
        for action in self._actions:
            action.full_help = getattr(action, "full_help", action.help)
            action.help = argparse.SUPPRESS if action in self._named_only else action.full_help  # accepted all the same
        if self._named_only:
            flags = ", ".join(action.option_strings[0] for action in self._named_only)
            self.epilog = (f"Also accepted, as PaddleNLP's TrainingArguments documents them (--help_all describes each): "
                           f"{flags}.")

    def parse_known_args(self, args=None, namespace=None):
        if args is not None and "--help_all" in args:
            for action in self._named_only:
                action.help = action.full_help
            self.epilog = None
            args = ["--help" if arg == "--help_all" else arg for arg in args]
        return super().parse_known_args(args, namespace)


def switch(value: str) -> bool:
    """A tool's on/off flag read as the dataclass flags are: `--force`, `--force true`, `--force false`."""
    if value.lower() in ("true", "yes", "1", "on"):
        return True
    if value.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def flag_names(argv: Sequence[str]) -> FrozenSet[str]:
    """The names (without dashes) of the flags in `argv`."""
    return frozenset(arg[2:].split("=")[0] for arg in argv if arg.startswith("--"))


def parser_for(dataclass_types: Sequence[type], description: Optional[str] = None) -> FlagParser:
    """A parser of `dataclass_types` and the log-level flags (ConsoleArguments, last, unless among them)."""
    extra = () if ConsoleArguments in dataclass_types else (ConsoleArguments,)
    return FlagParser(tuple(dataclass_types) + extra, formatter_class=HelpFormatter, description=description)


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


def command_line(argv: Sequence[str], default_argv: Sequence[str], parser: FlagParser) -> CommandLine:
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

"""The flags every training task shares, and how a run's command line is read: a recipe JSON followed by
overriding flags, or flags on top of the task's embedded default recipe (glm.cli.arguments), with the
training-specific rules on top (do_train/do_eval, evaluation at the end, a named model's defaults)."""

import os
from dataclasses import dataclass, field
from typing import ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple

import paddle
from paddlenlp.trainer.trainer_utils import IntervalStrategy
from paddlenlp.utils.log import logger

from ..bounds import COUNT, check_flag
from ..cli.arguments import command_line, parser_for
from ..cli.console import DropLogMessage, configure_logging, say, shown
from ..errors import UserError
from ..generation_settings import apply_checkpoint_settings, fit_to_model
from ..lora import DEFAULT_LORA_TARGETS

__all__ = ["ModelArguments", "DatasetArguments", "ParsedArguments", "parse_arguments", "resolve_amp"]


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(  # default: the task's (parse_arguments' `defaults`)
        default=None,
        metadata={"help": "A GLM checkpoint directory, or a PaddleNLP name such as THUDM/glm-large-chinese."},
    )
    label_smoothing: float = field(  # finetune_generation.py's default is THUDM's 0.1 (its `defaults`)
        default=0.0, metadata={"help": "THUDM's (1-e)*CE + e*mean_vocab(-log p) in generation's token loss."}
    )
    lr_decay_ratio: float = field(
        default=0.1, metadata={"help": "linear/cosine schedules end at learning_rate x this ratio (THUDM)."}
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters only; only they are saved."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: List[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Regexes of the Linear layers to adapt, e.g. '.*query_key_value.*' '.*mlp.*'."},
    )
    prefix_tuning: bool = field(
        default=False,
        metadata={"help": "P-tuning v2: train only per-layer prefix keys and values (glm/prefix.py); only they are saved."},
    )
    num_prefix_tokens: int = field(default=16, metadata={"help": "Prefix tokens per layer (--prefix_tuning)."})
    prefix_projection: bool = field(
        default=False,
        metadata={"help": "Train the prefix through P-tuning v2's reparameterization MLP (folded away when saving)."},
    )
    prefix_projection_hidden_size: Optional[int] = field(
        default=None, metadata={"help": "The MLP's hidden size (default: the model's hidden size)."}
    )
    use_flash_attention: bool = field(
        default=False, metadata={"help": "Fused scaled_dot_product_attention (for GPUs)."}
    )
    ignore_memory_check: bool = field(
        default=False, metadata={"help": "Run even when the memory plan says the run needs more than is available."}
    )
    # Not in a checkpoint's run record (run_record.py): the same attention computed another way; a check.
    # model_name_or_path is compared by the model's fingerprint (its path may change).
    free_flags: ClassVar[Tuple[str, ...]] = ("use_flash_attention", "ignore_memory_check")


@dataclass
class DatasetArguments:
    """The data flags every task script shares; a task subclasses it with its lengths."""

    dataset_name_or_path: Optional[str] = field(  # default: the task's (parse_arguments' `defaults`)
        default=None,
        metadata={"help": "Directory with train.json and dev.json (JSON Lines; .jsonl too)."},
    )
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip and count bad rows instead of stopping."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate only the first N dev rows."})
    eval_before_training: bool = field(default=False, metadata={"help": "Score the untrained model first."})
    # Not in a checkpoint's run record (run_record.py): evaluation only, or (skip_bad_rows) a refusal
    # rather than other rows. dataset_name_or_path is compared by its training file's hash.
    free_flags: ClassVar[Tuple[str, ...]] = ("skip_bad_rows", "max_eval_samples", "eval_before_training")

    def __post_init__(self):
        if self.max_eval_samples is not None:
            check_flag("max_eval_samples", self.max_eval_samples, COUNT)


class ParsedArguments(tuple):
    """The parsed argument dataclasses, in the order asked for (it unpacks as a tuple); `given_flags`, the
    names of the flags the user typed (an explicit --do_eval evaluates a finished run again); `recipe`, the
    recipe the run reads (None: the built-in defaults); `argv`, the recipe's flags then the command line's."""

    given_flags: FrozenSet[str]
    recipe: Optional[str]
    argv: List[str]

    def __new__(cls, parsed, given_flags, recipe, argv):
        instance = super().__new__(cls, parsed)
        instance.given_flags, instance.recipe, instance.argv = frozenset(given_flags), recipe, list(argv)
        return instance

    def recipe_to_suggest(self, recipe: str) -> Optional[str]:
        """`recipe` (the task's embedded default), to be suggested when a length does not fit the model,
        unless this run reads it already."""
        return None if self.recipe and os.path.abspath(self.recipe) == os.path.abspath(recipe) else recipe


def parse_arguments(dataclass_types: Sequence[type], argv, default_argv, defaults: Optional[Dict[str, str]] = None,
                    lengths: Sequence[str] = (), checkpoint_settings: bool = False) -> ParsedArguments:
    """`RECIPE.json [--flag value ...]`, or flags alone (glm.cli.arguments.command_line): flags alone without
    --model_name_or_path override `default_argv` (the embedded default recipe, then its output dir). With
    --model_name_or_path and no recipe, the dataclass defaults apply (THUDM's glm-large-chinese recipe),
    except that with `checkpoint_settings` the fields a model directory's generation_settings.json names
    (the lengths and decoding it was trained with) take its values, as in predict; and the `lengths`
    fields above the model's max_sequence_length come down to it, with a note. Flags the user gave are
    never changed. `defaults` ({flag: value}) are the task's own defaults of the dataclass fields, such
    as its model and dataset paths in the checkout. An explicit `--do_eval false` also turns off a
    recipe's eval_before_training (unless --eval_before_training is given too). Also sets the log level
    (ConsoleArguments, parsed here and not returned)."""
    default_recipe = default_argv[0]
    parser = parser_for(
        dataclass_types,
        description=f"Give a recipe (configs/*.json) first; flags after it override it. Without a recipe and "
        f"without --model_name_or_path, flags override the embedded default {shown(default_recipe)} "
        f"(its values, not the defaults below, apply). With --model_name_or_path and no recipe, the defaults "
        f"below (THUDM's glm-large-chinese recipe) apply.",
    )
    parser.set_defaults(**(defaults or {}))
    parser.usage = "%(prog)s [RECIPE.json] [--flag value ...]"
    shown_recipe = argv[0] if argv and argv[0].endswith(".json") and os.path.isfile(argv[0]) else default_recipe
    parser.show_recipe(shown_recipe)
    line = command_line(argv, default_argv, parser)
    configure_logging(line.argv)
    # No --evaluation_strategy, or `no` (which PaddleNLP turns into `steps` when do_eval is set): one evaluation
    # at the end.
    evaluation_at_end = flag_value(line.argv, "evaluation_strategy") in (None, "no")
    # PaddleNLP turns do_eval into an evaluation every logging_steps, with a warning; here do_eval means
    # one evaluation at the end (it decodes or scores the whole dev set, which costs far more than a loss
    # pass), so that warning would contradict what runs.
    misleading = DropLogMessage("evaluation_strategy reset to")
    if evaluation_at_end:
        logger.logger.addFilter(misleading)
    try:
        *parsed, _ = parser.common_parse(line.argv, False)  # ConsoleArguments: read by configure_logging
    except ValueError as error:  # unknown flags, bad values
        raise UserError(str(error).splitlines()[0]) from None
    finally:
        logger.logger.removeFilter(misleading)
    training_args = parsed[-1]
    check_sizes(training_args)
    for arguments in parsed:
        for name in ("model_name_or_path", "dataset_name_or_path"):
            if getattr(arguments, name, "") is None:
                raise UserError(f"--{name} is required")
    if not (training_args.do_train or training_args.do_eval):
        training_args.do_train = training_args.do_eval = True
    if evaluation_at_end:
        training_args.evaluation_strategy = IntervalStrategy.NO
    given = line.given
    if "do_eval" in given and not training_args.do_eval and "eval_before_training" not in given:
        for arguments in parsed:
            if hasattr(arguments, "eval_before_training"):
                arguments.eval_before_training = False  # --do_eval false: no decoding, not even before training
    if line.recipe is None:
        source = "none: " + model_defaults(parsed, given, lengths, checkpoint_settings)
    else:
        embedded = os.path.abspath(line.recipe) == os.path.abspath(default_recipe)
        source = shown(line.recipe) + (" (the embedded default)" if embedded else "")
    if training_args.should_log:
        say(f"recipe   {source}" + (f" + {' '.join(line.user_flags)}" if line.user_flags else ""))
    return ParsedArguments(parsed, given, line.recipe, line.argv)


def flag_value(argv: Sequence[str], name: str) -> Optional[str]:
    """The last value `argv` gives flag --`name` (`--name value` or `--name=value`), None if it does not."""
    value = None
    for index, arg in enumerate(argv):
        if arg == f"--{name}" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def model_defaults(parsed, given, lengths: Sequence[str], checkpoint_settings: bool) -> str:
    """The defaults of a run naming its model without a recipe (see parse_arguments), said in a few words."""
    model = next(arguments.model_name_or_path for arguments in parsed if hasattr(arguments, "model_name_or_path"))
    source = "the built-in defaults (THUDM's glm-large-chinese recipe)"
    settings_files = apply_checkpoint_settings([model], given, *parsed) if checkpoint_settings else []
    if settings_files:
        source = f"{shown(settings_files[0])} (the lengths and decoding the model was trained with), then {source}"
    lowered = fit_to_model(model, given, lengths, *parsed)
    if lowered:
        source += f", with {', '.join(lowered)}"
    return source


def check_sizes(training_args):
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        check_flag(name, getattr(training_args, name), COUNT)


def resolve_amp(training_args):
    """Half precision only where Paddle has the kernels; on CPU one warning, not the Trainer's crash."""
    if (training_args.fp16 or training_args.bf16) and not paddle.device.is_compiled_with_cuda():
        logger.warning(
            "fp16/bf16 need a GPU (Paddle's CPU kernels have no half precision): training in float32 on CPU"
        )
        training_args.fp16 = training_args.bf16 = False
    if training_args.fp16_opt_level == "O2" and (training_args.fp16 or training_args.bf16):
        return "float16" if training_args.fp16 else "bfloat16"  # load the weights in half precision directly
    return None

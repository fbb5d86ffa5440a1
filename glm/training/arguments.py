"""The flags every finetuning task shares, and how a run's command line is read: a recipe JSON followed
by overriding flags, or flags on top of the task's embedded default recipe."""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import paddle
from paddlenlp.trainer import PdArgumentParser
from paddlenlp.trainer.trainer_utils import IntervalStrategy
from paddlenlp.utils.log import logger

from ..errors import UserError
from ..lora import DEFAULT_LORA_TARGETS
from . import console

__all__ = ["ModelArguments", "DatasetArguments", "parse_arguments", "resolve_amp"]


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(  # default: the task's (parse_arguments' `defaults`)
        default=None,
        metadata={"help": "A GLM checkpoint directory, or a PaddleNLP name such as THUDM/glm-large-chinese."},
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "THUDM's (1-e)*CE + e*mean_vocab(-log p)."})
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
    use_flash_attention: bool = field(
        default=False, metadata={"help": "Fused scaled_dot_product_attention (for GPUs)."}
    )


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

    def __post_init__(self):
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(f"--max_eval_samples must be at least 1; got {self.max_eval_samples}")


def parse_arguments(dataclass_types: Sequence[type], argv, default_argv, defaults: Optional[Dict[str, str]] = None):
    """`RECIPE.json [--flag value ...]`, or flags alone. Flags alone without --model_name_or_path override
    `default_argv` (the embedded default recipe, then its output dir): every flag, the tiny model and its
    lengths stay together. With --model_name_or_path and no recipe, the dataclass defaults apply (THUDM's
    glm-large-chinese recipe). `defaults` ({flag: value}) are the task's own defaults of the dataclass
    fields, such as its model and dataset paths in the checkout. Also sets the log level (ConsoleArguments,
    parsed here and not returned)."""
    default_recipe = default_argv[0]
    parser = PdArgumentParser(
        tuple(dataclass_types) + (console.ConsoleArguments,),
        formatter_class=console.HelpFormatter,
        description=f"Give a recipe (configs/*.json) first; flags after it override it. Without a recipe and "
        f"without --model_name_or_path, flags override the embedded default {console.shown(default_recipe)} "
        f"(its values, not the defaults below, apply). With --model_name_or_path and no recipe, the defaults "
        f"below (THUDM's glm-large-chinese recipe) apply.",
    )
    parser.set_defaults(**(defaults or {}))
    given = list(argv)
    if given and given[0].endswith(".json"):
        recipe, user_flags = given[0], given[1:]
        if not os.path.isfile(recipe):
            raise UserError(f"{recipe}: no such recipe file")
        flags = user_flags
    elif any(arg.split("=")[0] == "--model_name_or_path" for arg in given):
        recipe, user_flags = None, given
        flags = user_flags
    else:
        recipe, user_flags = default_recipe, given
        flags = list(default_argv[1:]) + user_flags
    argv = (parser.read_json(recipe) if recipe else []) + flags
    console.configure_logging(argv)
    evaluation_at_end = not any(arg.split("=")[0] == "--evaluation_strategy" for arg in argv)
    # PaddleNLP turns do_eval into an evaluation every logging_steps, with a warning; here do_eval means
    # one evaluation at the end (it decodes or scores the whole dev set, which costs far more than a loss
    # pass), so that warning would contradict what runs.
    misleading = console.DropLogMessage("evaluation_strategy reset to")
    if evaluation_at_end:
        logger.logger.addFilter(misleading)
    try:
        *parsed, _ = parser.common_parse(argv, False)  # ConsoleArguments: read by configure_logging
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
    if training_args.should_log:
        if recipe is None:
            source = "none: the built-in defaults (THUDM's glm-large-chinese recipe)"
        else:
            embedded = os.path.abspath(recipe) == os.path.abspath(default_recipe)
            source = console.shown(recipe) + (" (the embedded default)" if embedded else "")
        console.say(f"recipe   {source}" + (f" + {' '.join(user_flags)}" if user_flags else ""))
    return tuple(parsed)


def check_sizes(training_args):
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise UserError(f"--{name} must be at least 1; got {getattr(training_args, name)}")


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

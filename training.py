"""The finetuning driver shared by the entry scripts (finetune_generation.py, and later task scripts).

One implementation of what every finetune run needs: a recipe JSON followed by overriding flags, half
precision where Paddle has the kernels, resuming from the last checkpoint, loading the model (with its
length checks and LoRA), THUDM's decay-to-ratio schedule, a resumable shuffle, checkpoint rotation in a
single process, and a clean exit of data-parallel workers. A task script adds its data, its evaluation
and its own argument dataclasses.
"""

import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Sequence

import glm  # noqa: F401  (first: sets the CPU thread count before paddle is imported)
import paddle
from paddle.io import DistributedBatchSampler
from paddlenlp.trainer import PdArgumentParser, ProgressCallback, Trainer, get_last_checkpoint
from paddlenlp.trainer.trainer_utils import IntervalStrategy
from paddlenlp.utils.log import logger

import console
from glm.lora import DEFAULT_LORA_TARGETS, apply_lora
from glm.loading import load_model_and_tokenizer
from training_curve import CURVE_FILE, plot_training_curve
from utils import UserError, write_json_atomic

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=os.path.join(ROOT, "configs", "glm-tiny-chinese"),
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


def parse_arguments(dataclass_types: Sequence[type], argv, default_argv):
    """`RECIPE.json [--flag value ...]`, or flags alone. Flags alone without --model_name_or_path override
    `default_argv` (the embedded default recipe, then its output dir): every flag, the tiny model and its
    lengths stay together. With --model_name_or_path and no recipe, the dataclass defaults apply (THUDM's
    glm-large-chinese recipe). Also sets the log level (ConsoleArguments, parsed here and not returned)."""
    default_recipe = default_argv[0]
    parser = PdArgumentParser(
        tuple(dataclass_types) + (console.ConsoleArguments,),
        formatter_class=console.HelpFormatter,
        description=f"Give a recipe (configs/*.json) first; flags after it override it. Without a recipe and "
        f"without --model_name_or_path, flags override the embedded default {console.shown(default_recipe)} "
        f"(its values, not the defaults below, apply). With --model_name_or_path and no recipe, the defaults "
        f"below (THUDM's glm-large-chinese recipe) apply.",
    )
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


def last_checkpoint_to_resume(training_args):
    if training_args.resume_from_checkpoint or not training_args.do_train:
        return training_args.resume_from_checkpoint
    output_dir = training_args.output_dir
    if not os.path.isdir(output_dir) or training_args.overwrite_output_dir:
        return None
    checkpoint = get_last_checkpoint(output_dir)
    if checkpoint is not None:
        logger.info(f"Resuming from {checkpoint} (--overwrite_output_dir to start afresh)")
    elif [name for name in os.listdir(output_dir) if not name.startswith(".")]:
        raise UserError(f"{output_dir} is not empty and holds no checkpoint: use --overwrite_output_dir or another --output_dir")
    return checkpoint


def load_for_training(model_args, dtype, lengths, **config_overrides):
    """The model and tokenizer, every `lengths` entry ({flag: value}) checked against the model's
    max_sequence_length, and LoRA applied when asked."""
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path,
        dtype,
        use_flash_attention=model_args.use_flash_attention,
        **config_overrides,
    )
    limit = model.config.max_sequence_length
    for name, length in lengths.items():
        if length > limit:
            raise UserError(
                f"--{name} {length} exceeds the model's max_sequence_length {limit}: pass --{name} {limit} or less"
                + "".join(f", or the recipe {recipe}" for recipe in recipes_that_fit(lengths, limit)[:1])
                + " (without a recipe the lengths default to THUDM's glm-large-chinese recipe)"
            )
    if model_args.lora:
        model = apply_lora(
            model,
            model_args.lora_rank,
            model_args.lora_alpha,
            model_args.lora_dropout,
            model_args.lora_target_modules,
            base_model_name_or_path=model_args.model_name_or_path,
        )
        model.print_trainable_parameters()
    return model, tokenizer


def recipes_that_fit(lengths: Dict[str, int], limit: int) -> List[str]:
    """The recipes in configs/ whose every length in `lengths` is at most `limit`."""
    fitting = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.json"))):
        with open(path, encoding="utf-8") as f:
            recipe = json.load(f)
        if all(name in recipe and recipe[name] <= limit for name in lengths):
            fitting.append(console.shown(path))
    return fitting


def lr_factor(step: int, warmup: int, total: int, ratio: float, cosine: bool) -> float:
    """Linear warm-up, then linear or cosine decay from 1 to `ratio` at the last step (THUDM's AnnealingLR)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cosine else 1.0 - progress
    return ratio + (1.0 - ratio) * decay


class EpochSeededBatchSampler(DistributedBatchSampler):
    """One process's shuffled batches, the order a function of (seed, epoch) only."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, num_replicas=1, rank=0, **kwargs)
        self.seed = seed

    def set_epoch(self, epoch=0, consumed_samples=0):
        super().set_epoch(self.seed + epoch)


class GLMTrainer(Trainer):
    """The PaddleNLP Trainer with THUDM's decay-to-ratio schedule, a resumable single-process shuffle and
    checkpoint rotation outside paddle.distributed.launch. Task trainers subclass it for evaluation."""

    def __init__(self, *args, lr_decay_ratio, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_decay_ratio = lr_decay_ratio
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(console.ConsoleProgress)

    def create_scheduler(self, num_training_steps: int):
        schedule = str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type))
        if self.lr_scheduler is None and schedule in ("linear", "cosine"):
            warmup = self.args.get_warmup_steps(num_training_steps)
            factor = partial(
                lr_factor, warmup=warmup, total=num_training_steps, ratio=self.lr_decay_ratio, cosine=schedule == "cosine"
            )
            self.lr_scheduler = paddle.optimizer.lr.LambdaDecay(self.args.learning_rate, factor)
        elif self.lr_decay_ratio and schedule not in ("linear", "cosine"):
            logger.warning(f"lr_decay_ratio applies to linear and cosine schedules; {schedule} ignores it")
        return super().create_scheduler(num_training_steps)

    def _get_train_sampler(self):
        # PaddleNLP shuffles a single process's data from the global RNG, so a run resumed in a later
        # epoch sees another order than the run it continues. A sampler shuffled by (seed + epoch),
        # which the Trainer sets at every epoch (set_epoch), gives a resumed run the same order.
        if self.args.world_size > 1 or self.train_dataset is None:
            return super()._get_train_sampler()
        return EpochSeededBatchSampler(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            shuffle=True,
            drop_last=self.args.dataloader_drop_last,
            seed=self.args.seed,
        )

    def _save_checkpoint(self, model, metrics=None):
        super()._save_checkpoint(model, metrics)
        # PaddleNLP rotates checkpoints only when local_rank == 0, which a single process (-1) never is,
        # so --save_total_limit would be ignored outside paddle.distributed.launch.
        if self.args.local_rank == -1 and self.args.should_save:
            self._rotate_checkpoints(use_mtime=True, output_dir=self.args.output_dir)


def train_and_evaluate(trainer, checkpoint, half_precision=False, eval_before_training=False, extra_files=None,
                       about=None, metric_labels=None):
    """Score the untrained model (if asked), train (resuming `checkpoint`), save the model with
    `extra_files` ({name: JSON value}) beside it, then evaluate; metrics go to *_results.json.

    The console shows what runs (the recipe line came from parse_arguments; `about` adds task lines such
    as {"model": ..., "data": ...}), then the untrained vs trained scores (`metric_labels`: {metric:
    column heading}, by default every metric) and where the files are; training_curve.png is drawn."""
    args = trainer.args
    started = time.time()
    if args.should_log:
        console.print_header(trainer, checkpoint, about or {})
    if half_precision:
        # Pure half precision: keep the model's explicit float32 softmax/loss casts (autocast would undo them).
        trainer.disable_autocast_context_manager()
    untrained = trained = None
    if eval_before_training:
        untrained = trainer.evaluate(metric_key_prefix="untrained")
        trainer.save_metrics("untrained", untrained)
    if args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        if args.should_save:
            for name, value in (extra_files or {}).items():
                write_json_atomic(os.path.join(args.output_dir, name), value)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if args.do_eval:
        trained = trainer.evaluate()
        trainer.log_metrics("eval", trained)
        trainer.save_metrics("eval", trained)
    if args.should_save and args.do_train:
        plot_training_curve(
            trainer.state.log_history, os.path.join(args.output_dir, CURVE_FILE),
            untrained=console.model_metrics(untrained, "untrained"), labels=metric_labels,
        )
    if args.should_log:
        console.print_summary(args, untrained, trained, metric_labels, time.time() - started)
    return trainer


def finish(trainer):
    """Return the trainer; data-parallel workers instead leave together and skip interpreter teardown."""
    if trainer.args.world_size > 1:
        # Data-parallel CPU workers can abort in interpreter teardown after finishing (gloo): leave
        # together and skip the teardown once everything is written.
        paddle.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return trainer

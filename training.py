"""The finetuning driver shared by the entry scripts (finetune_generation.py, and later task scripts).

One implementation of what every finetune run needs: a recipe JSON followed by overriding flags, half
precision where Paddle has the kernels, resuming from the newest complete checkpoint, loading the model (with
its length checks and LoRA), THUDM's decay-to-ratio schedule, a resumable shuffle, checkpoint rotation in
a single process, crash safety (crash_safety.py: a lock, checkpoints and a final model that a kill never
tears), a guard that stops at the first non-finite loss, and a clean exit of data-parallel workers. A task script adds its data, its evaluation
and its own argument dataclasses.
"""

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional, Sequence

import glm  # noqa: F401  (first: sets the CPU thread count before paddle is imported)
import paddle
from paddle.io import DistributedBatchSampler
from paddlenlp.trainer import PdArgumentParser, ProgressCallback, Trainer
from paddlenlp.trainer.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy
from paddlenlp.utils.log import logger

import console
from crash_safety import (
    STAGING,
    acquire_lock,
    check_writable,
    checkpoint_problem,
    newest_complete_checkpoint,
    publish_checkpoint,
    publish_final_model,
    release_lock,
    staging_dir,
)
from glm import GLMForConditionalGeneration
from glm.lora import BASE_FINGERPRINT, DEFAULT_LORA_TARGETS, apply_lora, base_fingerprint
from glm.loading import has_weights, load_model_and_tokenizer
from training_curve import CURVE_FILE, plot_training_curve
from utils import UserError, crash_point, write_json_atomic

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


@dataclass
class DatasetArguments:
    """The data flags every task script shares; a task subclasses it with its dataset default and lengths."""

    dataset_name_or_path: str = field(
        default=os.path.join(ROOT, "demo_data"),
        metadata={"help": "Directory with train.json and dev.json (JSON Lines; .jsonl too)."},
    )
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip and count bad rows instead of stopping."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate only the first N dev rows."})
    eval_before_training: bool = field(default=False, metadata={"help": "Score the untrained model first."})

    def __post_init__(self):
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(f"--max_eval_samples must be at least 1; got {self.max_eval_samples}")


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
    check_sizes(training_args)
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


def last_checkpoint_to_resume(training_args):
    """The checkpoint to resume: --resume_from_checkpoint, else the newest complete one in --output_dir.
    Before any loading, a training run also makes sure it can write --output_dir and takes its lock."""
    if not training_args.do_train:
        return training_args.resume_from_checkpoint
    output_dir = training_args.output_dir
    with_optimizer = not training_args.ignore_save_lr_and_optim
    if training_args.should_save:
        check_writable(output_dir)
        acquire_lock(output_dir)
        shutil.rmtree(os.path.join(output_dir, STAGING), ignore_errors=True)  # what a killed run was writing
    if training_args.resume_from_checkpoint:
        problem = checkpoint_problem(training_args.resume_from_checkpoint, with_optimizer)
        if problem:
            raise UserError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: {problem}")
        return training_args.resume_from_checkpoint
    if training_args.overwrite_output_dir or not os.path.isdir(output_dir):  # other workers: not made yet
        return None
    checkpoint = newest_complete_checkpoint(output_dir, with_optimizer, remove_incomplete=training_args.should_save)
    if checkpoint is not None:
        logger.info(f"Resuming from {checkpoint}, the newest complete checkpoint (--overwrite_output_dir to start afresh)")
    elif [name for name in os.listdir(output_dir) if not name.startswith(".")]:
        raise UserError(f"{output_dir} is not empty and holds no checkpoint: use --overwrite_output_dir or another --output_dir")
    return checkpoint


def load_for_training(model_args, dtype, lengths, model_class=GLMForConditionalGeneration, task_recipe=None,
                      **config_overrides):
    """The model (a `model_class`) and tokenizer, every `lengths` entry ({flag: value}) checked against
    the model's max_sequence_length (a length that does not fit names `task_recipe`, the task's embedded
    default recipe, when that fits), and LoRA applied when asked."""
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path,
        dtype,
        model_class=model_class,
        use_flash_attention=model_args.use_flash_attention,
        **config_overrides,
    )
    limit = model.config.max_sequence_length
    for name, length in lengths.items():
        if length > limit:
            raise UserError(
                f"--{name} {length} exceeds the model's max_sequence_length {limit}: pass --{name} {limit} or less"
                + (f", or the recipe {console.shown(task_recipe)}" if recipe_fits(task_recipe, lengths, limit) else "")
                + " (without a recipe the lengths default to THUDM's glm-large-chinese recipe)"
            )
    if model_args.lora:
        if model_args.lora_rank < 1:
            raise UserError(f"--lora_rank must be at least 1; got {model_args.lora_rank}")
        if os.path.isdir(model_args.model_name_or_path) and not has_weights(model_args.model_name_or_path):
            raise UserError(
                f"--lora on {model_args.model_name_or_path}, which holds no weights: its random init could never be "
                "reproduced to apply the adapter later; finetune it first (without --lora) and adapt that"
            )
        fingerprint = base_fingerprint(model_args.model_name_or_path, model.config)
        model = apply_lora(
            model,
            model_args.lora_rank,
            model_args.lora_alpha,
            model_args.lora_dropout,
            model_args.lora_target_modules,
            base_model_name_or_path=model_args.model_name_or_path,
        )
        model.base_fingerprint = fingerprint  # GLMTrainer writes it beside every saved adapter
        model.print_trainable_parameters()
    return model, tokenizer


def recipe_fits(path: Optional[str], lengths: Dict[str, int], limit: int) -> bool:
    """Whether the recipe at `path` sets every length in `lengths` to at most `limit`. Only the task's own
    recipe is suggested: another task's recipe would fit the lengths and still be the wrong job."""
    if not path:
        return False
    with open(path, encoding="utf-8") as f:
        recipe = json.load(f)
    return all(name in recipe and recipe[name] <= limit for name in lengths)


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


class TrainingDiverged(UserError):
    """A non-finite loss or weights: training stops before anything non-finite is saved."""


class GLMTrainer(Trainer):
    """The PaddleNLP Trainer with THUDM's decay-to-ratio schedule, a resumable single-process shuffle,
    checkpoints that appear only when complete (rotated outside paddle.distributed.launch too) and a stop
    at the first non-finite loss. Task trainers subclass it for evaluation."""

    def __init__(self, *args, lr_decay_ratio, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_decay_ratio = lr_decay_ratio
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(console.ConsoleProgress)
        self.last_finite_loss = None  # (step, loss)
        save = self._save_ckpt_func

        def save_then_crash_point(obj, path, *args, **kwargs):
            save(obj, path, *args, **kwargs)
            crash_point(f"saved:{os.path.basename(path)}")
            crash_point(f"torn:{os.path.basename(path)}", torn_file=path)

        self._save_ckpt_func = save_then_crash_point  # the weights and optimizer files of every save

    def training_step(self, model, inputs):
        # The loss, not the gradients: with fp16 dynamic loss scaling, steps the scaler skips for inf
        # gradients are normal and keep a finite loss. One host sync per step is the price.
        loss = super().training_step(model, inputs)
        step = self.state.global_step + 1
        value = float(loss) * max(1, self.args.gradient_accumulation_steps)
        if not math.isfinite(value):
            last = f"the last finite loss was {self.last_finite_loss[1]:.4g} at step {self.last_finite_loss[0]}" \
                if self.last_finite_loss else "no step before it had a finite loss"
            raise TrainingDiverged(
                f"the loss became {value} at step {step} ({last}); nothing was saved from this step on. "
                "Try a lower --learning_rate (on a GPU with fp16: bf16, or a smaller --scale_loss)"
            )
        self.last_finite_loss = (step, value)
        return loss

    def check_finite_weights(self):
        for name, param in self.model.named_parameters():
            if not bool(paddle.isfinite(param).all()):
                raise TrainingDiverged(
                    f"parameter {name} holds non-finite values at step {self.state.global_step}; not saving it. "
                    "Try a lower --learning_rate (on a GPU with fp16: bf16, or a smaller --scale_loss)"
                )

    def _save(self, output_dir=None, state_dict=None, merge_tensor_parallel=False):
        super()._save(output_dir, state_dict, merge_tensor_parallel)
        fingerprint = getattr(self.model, "base_fingerprint", None)
        if fingerprint is not None and self.args.should_save:
            write_json_atomic(os.path.join(output_dir or self.args.output_dir, BASE_FINGERPRINT), fingerprint)

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
        # PaddleNLP writes checkpoint-N in place, trainer_state.json before the RNG state, and its
        # get_last_checkpoint takes the highest number: a kill mid-save blocked or silently reset every
        # rerun. The whole checkpoint is written under .staging and renamed once complete.
        self.check_finite_weights()
        run_dir = self.args.output_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING)
        if self.args.should_save:
            staging_dir(run_dir, name)
        self.args.output_dir = staging_root
        try:
            super()._save_checkpoint(model, metrics)
        finally:
            self.args.output_dir = run_dir
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        if self.args.should_save:
            paddle.save(self.args, os.path.join(staged, "training_args.bin"))  # with the real output_dir
            publish_checkpoint(staged, final)
            # PaddleNLP rotates only when local_rank == 0 (never in a single process), and here it
            # would rotate inside .staging.
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)


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
        if args.should_save:
            check_free_space(trainer.model, args.output_dir)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        save_final_model(trainer, extra_files or {})
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
    release_lock(args.output_dir)
    return trainer


def save_final_model(trainer, extra_files):
    """The model and `extra_files` written whole under .staging, then moved into --output_dir."""
    args = trainer.args
    trainer.check_finite_weights()
    staged = os.path.join(args.output_dir, STAGING, "final")
    if args.should_save:
        staging_dir(args.output_dir, "final")
    trainer.save_model(staged)
    if args.should_save:
        for name, value in extra_files.items():
            write_json_atomic(os.path.join(staged, name), value)
        crash_point("final:before-rename")
        publish_final_model(staged, args.output_dir)


def check_free_space(model, output_dir):
    """Fail before training when a checkpoint (weights + two Adam moments of the trained ones) and the
    final model cannot fit on the disk of `output_dir`."""
    weights = sum(p.numel().item() * p.element_size() for p in model.parameters())
    moments = sum(2 * 4 * p.numel().item() for p in model.parameters() if not p.stop_gradient)
    needed = 2 * weights + moments
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UserError(
            f"--output_dir {output_dir}: {free / 2**20:.0f} MiB free, a checkpoint and the final model need "
            f"about {needed / 2**20:.0f} MiB"
        )


def finish(trainer):
    """Return the trainer; data-parallel workers instead leave together and skip interpreter teardown."""
    if trainer.args.world_size > 1:
        # Data-parallel CPU workers can abort in interpreter teardown after finishing (gloo): leave
        # together and skip the teardown once everything is written.
        paddle.distributed.barrier()
        release_lock(trainer.args.output_dir)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return trainer

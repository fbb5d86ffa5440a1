"""The finetuning driver every task script shares: what runs between parsing the flags and exiting.

Before any loading, a training run checks --output_dir is writable, takes its lock and picks where to
start (`last_checkpoint_to_resume`: the newest complete checkpoint, refused when it was written with
other settings; or nothing to train, when --output_dir holds the finished run); then the model is
loaded with its length checks and LoRA; `train_and_evaluate` scores the untrained model (if asked),
trains, saves the final model so that a kill never tears it, evaluates, draws training_curve.png,
prints the console summary and records the run as complete; data-parallel workers leave together
(`finish`). A task script adds its data, its evaluation (a GLMTrainer subclass), its own argument
dataclasses and what determines its result (run_record.run_settings).
"""

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Dict, Optional

import paddle
from paddlenlp.trainer import TrainerState
from paddlenlp.utils.log import logger

from ..errors import UserError, on_interrupt
from ..files import crash_point, write_json_atomic
from ..loading import has_weights, load_model_and_tokenizer
from ..lora import apply_lora, base_fingerprint
from ..modeling import GLMForConditionalGeneration
from . import console
from .crash_safety import (
    STAGING,
    TRAINER_STATE,
    acquire_lock,
    check_writable,
    checkpoint_problem,
    newest_complete_checkpoint,
    publish_final_model,
    release_lock,
    remove_checkpoints,
    staging_dir,
)
from .curve import CURVE_FILE, plot_training_curve
from .run_record import RECORD_FILE, RunSettings, read_record

__all__ = ["Resume", "last_checkpoint_to_resume", "load_for_training", "train_and_evaluate", "finish"]


@dataclass
class Resume:
    """Where a training run starts: `checkpoint` (None: from the start) and the run's `settings`; with
    `complete`, --output_dir already holds the finished run these settings ask for."""

    checkpoint: Optional[str]
    settings: RunSettings
    complete: bool = False


def last_checkpoint_to_resume(training_args, settings: RunSettings) -> Resume:
    """Where to start: --resume_from_checkpoint, else the newest complete checkpoint in --output_dir, or
    nothing to train when --output_dir holds the finished run. A checkpoint (or finished run) recorded
    with other `settings` (run_record.run_settings: what determines the result) is refused in one line
    naming each changed flag; one that asks for more steps is continued. Before any loading, a training
    run also makes sure it can write --output_dir and takes its lock."""
    if not training_args.do_train:
        return Resume(training_args.resume_from_checkpoint, settings)
    output_dir = training_args.output_dir
    with_optimizer = not training_args.ignore_save_lr_and_optim
    if training_args.should_save:
        check_writable(output_dir)
        acquire_lock(output_dir)
        shutil.rmtree(os.path.join(output_dir, STAGING), ignore_errors=True)  # what a killed run was writing
        on_interrupt(lambda: rerun_note(output_dir, with_optimizer))
    if training_args.resume_from_checkpoint:
        checkpoint = training_args.resume_from_checkpoint
        problem = checkpoint_problem(checkpoint, with_optimizer)
        if problem:
            raise UserError(f"--resume_from_checkpoint {checkpoint}: {problem}")
        refuse_other_settings(settings, checkpoint, f"--resume_from_checkpoint {checkpoint} was written by a run with "
                              "other settings", "rerun with its settings to resume it, or without --resume_from_checkpoint")
        return Resume(checkpoint, settings)
    if training_args.overwrite_output_dir:
        if training_args.should_save and os.path.isdir(output_dir):
            remove_checkpoints(output_dir)  # afresh: the old run's checkpoints would be resumed or rotated in
            if os.path.exists(os.path.join(output_dir, RECORD_FILE)):
                os.unlink(os.path.join(output_dir, RECORD_FILE))
        return Resume(None, settings)
    if not os.path.isdir(output_dir):  # other workers: not made yet
        return Resume(None, settings)
    ways_on = "rerun with its settings to continue it, or start afresh with --overwrite_output_dir or another --output_dir"
    finished = read_record(output_dir)
    if finished is not None:
        refuse_other_settings(settings, output_dir, f"--output_dir {output_dir} holds a finished run with other settings",
                              ways_on)
        if settings.total_steps(finished.get("steps_per_epoch", 1)) == finished.get("total_steps"):
            return Resume(None, settings, complete=True)
    checkpoint = newest_complete_checkpoint(output_dir, with_optimizer, remove_incomplete=training_args.should_save)
    if checkpoint is not None:
        refuse_other_settings(settings, checkpoint, f"--output_dir {output_dir} holds {os.path.basename(checkpoint)} "
                              "of a run with other settings", ways_on)
        logger.info(f"Resuming from {checkpoint}, the newest complete checkpoint (--overwrite_output_dir to start afresh)")
    elif [name for name in os.listdir(output_dir) if not name.startswith(".")]:
        raise UserError(f"{output_dir} is not empty and holds no checkpoint: use --overwrite_output_dir or another --output_dir")
    return Resume(checkpoint, settings)


def refuse_other_settings(settings: RunSettings, directory: str, what: str, ways_on: str):
    """A UserError naming every setting of `directory`'s run record that this run changes."""
    record = read_record(directory)
    if record is None:
        logger.warning(f"{directory} records no settings (written before they were recorded): continuing it unchecked")
        return
    changes = settings.differences(record)
    if changes:
        raise UserError(f"{what}: {', '.join(changes)}; {ways_on}")


def rerun_note(output_dir: str, with_optimizer: bool) -> str:
    """What rerunning the same command does, for the line printed when a run is interrupted."""
    checkpoint = newest_complete_checkpoint(output_dir, with_optimizer, remove_incomplete=False, report=False)
    if checkpoint is None:
        return "rerunning the same command starts it again (no checkpoint was written yet)"
    return f"rerunning the same command continues from {console.shown(checkpoint)}"


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


def train_and_evaluate(trainer, resume: Resume, half_precision=False, eval_before_training=False, extra_files=None,
                       about=None, metric_labels=None):
    """Score the untrained model (if asked), train (from `resume`, last_checkpoint_to_resume's answer),
    save the model with `extra_files` ({name: JSON value}) beside it, then evaluate; metrics go to
    *_results.json, and the run is recorded as complete (run_record.json) once all of it is written.
    A run already complete is left as it is, or only evaluated again on an explicit --do_eval.

    The console shows what runs (the recipe line came from parse_arguments; `about` adds task lines such
    as {"model": ..., "data": ...}), then the untrained vs trained scores (`metric_labels`: {metric:
    column heading}, by default every metric) and where the files are; training_curve.png is drawn."""
    args = trainer.args
    trainer.run_settings = resume.settings
    started = time.time()
    if resume.complete:
        return evaluate_complete_run(trainer, metric_labels, started)
    if args.should_log:
        console.print_header(trainer, resume.checkpoint, about or {})
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
        result = trainer.train(resume_from_checkpoint=resume.checkpoint)
        crash_point("train:done")
        save_final_model(trainer, extra_files or {})
        crash_point("final:published")
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        crash_point("train:results-written")
    if args.do_eval:
        trained = trainer.evaluate()
        trainer.log_metrics("eval", trained)
        trainer.save_metrics("eval", trained)
        crash_point("eval:results-written")
    if args.should_save and args.do_train:
        plot_training_curve(
            trainer.state.log_history, os.path.join(args.output_dir, CURVE_FILE),
            untrained=console.model_metrics(untrained, "untrained"), labels=metric_labels,
        )
        write_json_atomic(os.path.join(args.output_dir, RECORD_FILE), trainer.run_record())  # last: complete
        crash_point("run:recorded")
    if args.should_log:
        console.print_summary(args, untrained, trained, metric_labels, time.time() - started)
    release_lock(args.output_dir)
    return trainer


def evaluate_complete_run(trainer, metric_labels, started):
    """--output_dir holds the finished run: say so and leave it, or evaluate its model again when the
    user asked with --do_eval (not merely a recipe's do_eval)."""
    args = trainer.args
    state_file = os.path.join(args.output_dir, TRAINER_STATE)
    if os.path.isfile(state_file):
        trainer.state = TrainerState.load_from_json(state_file)
    again = args.do_eval and "do_eval" in getattr(args, "given_flags", ())
    if args.should_log:
        console.say(f"output   {console.shown(args.output_dir)}: the run is complete ({trainer.state.global_step} steps); "
                    + ("evaluating its model again (--do_eval)" if again else "its outputs are left as they are "
                       "(--do_eval evaluates it again, --overwrite_output_dir trains it afresh)"))
    trained = None
    if again:
        trainer.load_trained_weights(args.output_dir)
        trained = trainer.evaluate()
        trainer.log_metrics("eval", trained)
        trainer.save_metrics("eval", trained)
    if args.should_log and again:
        console.print_summary(args, None, trained, metric_labels, time.time() - started)
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

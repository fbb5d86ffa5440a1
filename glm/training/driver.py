"""What a training run does once its model and data are ready (glm.training.task runs it): score the
untrained model (if asked), train, save the final model so that a kill never tears it, evaluate, draw
training_curve.png, print the console summary and record the run as complete; or, when --output_dir holds
the finished run already, leave it (or evaluate it again on an explicit --do_eval).
"""

import json
import os
import shutil
import time
from typing import AbstractSet, Optional

from paddlenlp.trainer import TrainerState

from ..errors import UserError
from ..files import crash_point, write_json_atomic
from ..memory.plan import Plan, memory_metrics, memory_summary
from ..prefix import prefix_model
from . import console
from .checkpoints import STAGING, TRAINER_STATE, publish_final_model, staging_dir
from .curve import CURVE_FILE, plot_training_curve
from .resume import Resume
from .run_record import RECORD_FILE

__all__ = ["train_and_evaluate"]

UNTRAINED_RESULTS = "untrained_results.json"  # the Trainer's save_metrics("untrained", ...)


def train_and_evaluate(trainer, resume: Resume, given_flags: AbstractSet[str] = frozenset(), half_precision=False,
                       eval_before_training=False, extra_files=None, about=None, metric_labels=None,
                       memory: Optional[Plan] = None):
    """Score the untrained model (if asked), train (from `resume`, decide_resume's answer),
    save the model with `extra_files` ({name: JSON value}) beside it, then evaluate; metrics go to
    *_results.json, and the run is recorded as complete (run_record.json) once all of it is written.
    A run already complete is left as it is, or only evaluated again on an explicit --do_eval (among
    `given_flags`, the flags the user typed).

    The console shows what runs (the recipe line came from parse_arguments; `about` adds task lines such
    as {"model": ..., "data": ...}), then the untrained vs trained scores (`metric_labels`: {metric:
    column heading}, by default every metric) and where the files are; training_curve.png is drawn.
    train_results.json and eval_results.json hold the estimated (`memory`'s) and the measured peaks."""
    args = trainer.args
    started = time.time()
    if resume.complete:
        return evaluate_complete_run(trainer, "do_eval" in given_flags, metric_labels, started)
    if args.should_log:
        console.print_header(trainer, resume.checkpoint, about or {})
    if half_precision:
        # Pure half precision: keep the model's explicit float32 softmax/loss casts (autocast would undo them).
        trainer.disable_autocast_context_manager()
    untrained = trained = None
    if eval_before_training:
        untrained = untrained_scores(trainer, resume)
    if args.do_train:
        if args.should_save:
            check_free_space(trainer.model, args.output_dir)
        result = trainer.train(resume_from_checkpoint=resume.checkpoint)
        result.metrics.update(memory_metrics(memory))
        result.metrics["trainable_parameters"] = console.trainable_parameters(trainer.model)
        crash_point("train:done")
        save_final_model(trainer, extra_files or {})
        crash_point("final:published")
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        crash_point("train:results-written")
    if args.do_eval:
        trained = trainer.evaluate()
        trained.update(memory_metrics(memory))
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
        console.print_summary(args, untrained, trained, metric_labels, time.time() - started,
                              memory_summary(memory) if args.do_train else None)
    return trainer


def untrained_scores(trainer, resume: Resume) -> dict:
    """The untrained model's scores: a resumed run takes those its first start wrote (the same model and
    settings, as decide_resume checked: scoring it again would decode the dev set again for the same
    figures); a file a kill tore is scored again."""
    path = os.path.join(trainer.args.output_dir, UNTRAINED_RESULTS)
    if resume.checkpoint and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                untrained = json.load(f)
            if trainer.args.should_log:
                console.say(f"untrained scores from {console.shown(path)}, as the run's first start measured them")
            return untrained
        except ValueError:
            pass
    untrained = trainer.evaluate(metric_key_prefix="untrained")
    trainer.save_metrics("untrained", untrained)
    return untrained


def evaluate_complete_run(trainer, do_eval_given: bool, metric_labels, started):
    """--output_dir holds the finished run: say so and leave it, or evaluate its model again when the
    user asked with --do_eval (`do_eval_given`; not merely a recipe's do_eval)."""
    args = trainer.args
    state_file = os.path.join(args.output_dir, TRAINER_STATE)
    if os.path.isfile(state_file):
        trainer.state = TrainerState.load_from_json(state_file)
    again = args.do_eval and do_eval_given
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
    return trainer


def save_final_model(trainer, extra_files):
    """The model and `extra_files` written whole under .staging, then moved into --output_dir. A prefix is
    saved folded (its reparameterization MLP replaced by its output: the same prefix, nothing to run)."""
    args = trainer.args
    trainer.check_finite_weights()
    if prefix_model(trainer.model) is not None:
        trainer.model.fold()
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

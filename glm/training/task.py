"""The one skeleton every training task runs on (generation, cloze, pretraining): a `Task` supplies its
arguments, data, inputs and trainer class; `run_task` owns the rest, in this order:

    the task's own refusals and preparation (Task.prepare; nothing is written before them)
    precision            fp16/bf16 O2 where Paddle has the kernels (resolve_amp)
    run settings         what determines the result (run_record.run_settings), passed to the trainer
    with the output dir's lock:
      resume decision    decide_resume (reads only)
      memory             the run's memory plan; a run that cannot fit is refused before loading
      seed               before the model exists: a random init depends on it
      loading            the one loader (lengths checked), a new LoRA adapter or prefix applied when asked,
                         then the task's own wrapping (Task.adapt_model)
      data               the task's datasets, collator and trainer arguments, built with the tokenizer
      output dir         prepare_output_dir: the decision's side effects, once nothing can be refused
      trainer            the task's GLMTrainer subclass, given the run settings and the base's fingerprint
      train and evaluate driver.train_and_evaluate
    data-parallel workers leave together (`finish`)
"""

import json
import os
import sys
from dataclasses import dataclass, field, replace
from typing import AbstractSet, Any, Dict, Optional, Sequence, Tuple

import paddle
from paddlenlp.trainer import set_seed

from ..bounds import COUNT, check_flag
from ..checkpoint import has_weights
from ..cli.console import shown
from ..errors import CheckpointError, UserError
from ..files import output_dir_lock
from ..loading import load_model_and_tokenizer
from ..lora import apply_lora, base_fingerprint
from ..prefix import apply_prefix, prefix_parameters
from ..memory.estimate import DecodingLoad, TrainingLoad
from ..memory.measure import current_memory_bytes, on_gpu
from ..memory.plan import Plan, header_line, refuse_if_it_cannot_fit, sharding_stage, training_plan
from ..memory.shapes import ModelShape, model_shape, uses_dropout
from ..modeling import GLMForConditionalGeneration
from . import console
from .arguments import resolve_amp
from .driver import train_and_evaluate
from .resume import decide_resume, prepare_output_dir
from .run_record import run_settings
from .trainer import GLMTrainer

__all__ = ["Task", "TaskData", "run_task", "memory_plan", "load_for_training", "finish", "refuse_weightless_base"]


@dataclass
class TaskData:
    """What a task's data gives the trainer: datasets, how to batch them, the task's own trainer
    arguments, the header's data lines and files to save beside the final model ({name: JSON value})."""

    train_dataset: Any
    eval_dataset: Any
    collator: Any
    trainer_arguments: Dict[str, Any] = field(default_factory=dict)
    about: Dict[str, str] = field(default_factory=dict)
    extra_files: Dict[str, Any] = field(default_factory=dict)


class Task:
    """A training task, as `run_task` uses it. Subclasses set the class attributes and override what
    differs; `model_args` is a training.arguments.ModelArguments, `training_args` PaddleNLP's
    TrainingArguments, `given_flags` the names of the flags the user typed."""

    model_class = GLMForConditionalGeneration
    trainer_class = GLMTrainer
    metric_labels: Optional[Dict[str, str]] = None  # {metric: column heading}; None: every metric
    default_recipe: Optional[str] = None  # the task's embedded default, suggested when a length does not fit

    def __init__(self, model_args, training_args, given_flags: AbstractSet[str] = frozenset()):
        self.model_args, self.training_args, self.given_flags = model_args, training_args, frozenset(given_flags)

    def prepare(self):
        """Refuse what this task cannot run, and settle what the run's settings depend on, before anything is
        written or loaded."""

    def recorded_arguments(self) -> Sequence:
        """The task's argument dataclasses whose fields determine the trained weights (besides the model's
        and the training arguments)."""
        return ()

    def inputs(self) -> Dict[str, Any]:
        """{flag: fingerprint} of the flags compared by what they point to rather than by their path."""
        return {}

    def lengths(self) -> Dict[str, int]:
        """{flag: length} that must fit the model's max_sequence_length."""
        return {}

    def config_overrides(self) -> Dict[str, Any]:
        """config.json fields the run replaces (e.g. label_smoothing)."""
        return {}

    def eval_before_training(self) -> bool:
        return False

    def row_tokens(self) -> Tuple[int, int]:
        """(tokens, scored tokens) of the longest training row, for the memory plan."""
        raise NotImplementedError

    def evaluation_decoding(self, shape: ModelShape) -> Optional[DecodingLoad]:
        """What the evaluation decodes (for the memory plan), or None when it only scores."""
        return None

    def data(self, tokenizer) -> TaskData:
        raise NotImplementedError

    def adapter_parameters(self, shape: ModelShape) -> int:
        """The parameters that train beside a frozen base, when only they do (for the memory plan); 0 when
        the base's own weights train (or LoRA's, which the plan counts itself)."""
        args = self.model_args
        if not args.prefix_tuning:
            return 0
        return prefix_parameters(shape.num_layers, shape.hidden_size, args.num_prefix_tokens, args.prefix_projection,
                                 args.prefix_projection_hidden_size)

    def adapt_model(self, model, base: Optional[dict]) -> Tuple[Any, Optional[dict]]:
        """The loaded model (and the base's fingerprint, for what is saved beside a frozen base's adapter) as
        the task trains it: a task wraps it here (THUDM's P-tuning, glm/ptuning.py)."""
        return model, base


def run_task(task: Task, callbacks: Sequence = ()) -> GLMTrainer:
    """Train and evaluate `task` (see the module's docstring); returns its trainer."""
    args, model_args = task.training_args, task.model_args
    task.prepare()
    check_adapter_flags(model_args)
    dtype = resolve_amp(args)
    settings = run_settings((model_args, *task.recorded_arguments(), args), inputs=task.inputs())
    with output_dir_lock(args.output_dir, hold=args.do_train and args.should_save):
        resume = decide_resume(args, settings)
        memory = run_memory_plan(task, dtype) if args.do_train and not resume.complete else None
        if memory is not None and not model_args.ignore_memory_check:
            refuse_if_it_cannot_fit(memory)  # before any weights are loaded
        set_seed(args.seed)
        model, tokenizer, base = load_for_training(model_args, dtype, task.lengths(), task.model_class,
                                                   task.default_recipe, **task.config_overrides())
        model, base = task.adapt_model(model, base)
        data = task.data(tokenizer)
        prepare_output_dir(args, resume)  # last: a model or data refused above leaves --output_dir as it was
        trainer = task.trainer_class(
            model=model, args=args, train_dataset=data.train_dataset, eval_dataset=data.eval_dataset,
            tokenizer=tokenizer, data_collator=data.collator, callbacks=list(callbacks),
            lr_decay_ratio=model_args.lr_decay_ratio, run_settings=settings, base_fingerprint=base,
            **data.trainer_arguments,
        )  # fmt: skip
        about = {"model": console.describe_model(model_args, model), **data.about}
        if memory is not None:
            about["memory"] = header_line(memory)
        train_and_evaluate(
            trainer, resume, task.given_flags, half_precision=dtype is not None,
            eval_before_training=task.eval_before_training(), extra_files=data.extra_files, about=about,
            metric_labels=task.metric_labels, memory=memory,
        )  # fmt: skip
    return trainer


def memory_plan(task: Task, half: bool, devices: int, sharding: int = 0, gpu: bool = False,
                runtime: Optional[int] = None) -> Optional[Plan]:
    """The memory plan of `task` (training, then the evaluation's decoding) on `devices` devices with
    sharding stage `sharding` (0: none), in half precision O2 or not; None for a model whose shape is
    unknown (loading then says what is wrong with it). `runtime`: what the process holds before the model
    (None: glm.memory.estimate's typical figure)."""
    args, model_args = task.training_args, task.model_args
    try:
        shape = model_shape(model_args.model_name_or_path)
    except CheckpointError:
        return None
    length, scored = task.row_tokens()
    training = TrainingLoad(
        shape, args.per_device_train_batch_size, length, scored, recompute=bool(args.recompute), half=half,
        lora_rank=model_args.lora_rank if model_args.lora else 0, lora_targets=tuple(model_args.lora_target_modules),
        adapter_parameters=task.adapter_parameters(shape),
        devices=max(1, devices), sharding_stage=sharding, accumulation=args.gradient_accumulation_steps,
        dropout=uses_dropout(model_args.model_name_or_path), label_smoothing=model_args.label_smoothing > 0, gpu=gpu,
    )  # fmt: skip
    evaluation = task.evaluation_decoding(shape) if args.do_eval or task.eval_before_training() else None
    if evaluation is not None:
        evaluation = replace(evaluation, gpu=gpu)
    return training_plan(training, evaluation, runtime)


def run_memory_plan(task: Task, dtype) -> Optional[Plan]:
    """The plan of the run about to start here, with what this process holds now."""
    args = task.training_args
    stage = sharding_stage([getattr(option, "value", str(option)) for option in args.sharding or []])
    gpu = on_gpu()
    return memory_plan(task, dtype is not None, args.world_size, stage, gpu, None if gpu else current_memory_bytes())


def check_adapter_flags(model_args):
    """--lora's and --prefix_tuning's own refusals, before anything else is said of the run (a rerun's
    differences included)."""
    if model_args.lora and model_args.prefix_tuning:
        raise UserError("--lora and --prefix_tuning: choose one (each trains its own few parameters on a frozen base)")
    if model_args.lora:
        check_flag("lora_rank", model_args.lora_rank, COUNT)
    if model_args.prefix_tuning:
        check_flag("num_prefix_tokens", model_args.num_prefix_tokens, COUNT)
        if model_args.prefix_projection_hidden_size is not None:
            check_flag("prefix_projection_hidden_size", model_args.prefix_projection_hidden_size, COUNT)
    else:
        defaults = type(model_args)()
        for name in ("num_prefix_tokens", "prefix_projection", "prefix_projection_hidden_size"):
            if getattr(model_args, name) != getattr(defaults, name):
                raise UserError(f"--{name} applies to --prefix_tuning true")
    flag = "--lora" if model_args.lora else "--prefix_tuning" if model_args.prefix_tuning else None
    if flag:
        refuse_weightless_base(flag, model_args.model_name_or_path, "adapter" if model_args.lora else "prefix",
                               f"(without {flag}) and adapt that")


def refuse_weightless_base(flags: str, path: str, what: str, way_out: str):
    """UserError when `path` is a directory without weights: a `what` (adapter, prefix, prompt) trained on its
    random init could never be applied again (`flags`: what asked for it; `way_out`: how to train one)."""
    if os.path.isdir(path) and not has_weights(path):
        raise UserError(f"{flags} on {path}, which holds no weights: its random init could never be reproduced to "
                        f"apply the {what} later; finetune it first {way_out}")


def load_for_training(model_args, dtype, lengths: Dict[str, int], model_class=GLMForConditionalGeneration,
                      task_recipe: Optional[str] = None, **config_overrides) -> Tuple[Any, Any, Optional[dict]]:
    """The model (a `model_class`), its tokenizer, and the base's fingerprint when a LoRA adapter or a prefix
    is to be trained (None otherwise). Every `lengths` entry ({flag: value}) must fit the model (a length
    that does not names `task_recipe`, the task's embedded default recipe, when that fits); with --lora the
    adapter, with --prefix_tuning the prefix, is applied and only it trains."""

    def suggest(limit: int) -> str:
        return f", or the recipe {shown(task_recipe)}" if recipe_fits(task_recipe, lengths, limit) else ""

    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path, dtype, model_class=model_class, lengths=lengths, suggest=suggest,
        use_flash_attention=model_args.use_flash_attention, **config_overrides,
    )  # fmt: skip
    if not (model_args.lora or model_args.prefix_tuning):
        return model, tokenizer, None
    fingerprint = base_fingerprint(model_args.model_name_or_path, model.config)
    if model_args.prefix_tuning:
        model = apply_prefix(model, model_args.num_prefix_tokens, model_args.prefix_projection,
                             model_args.prefix_projection_hidden_size)
        return model, tokenizer, fingerprint
    model = apply_lora(model, model_args.lora_rank, model_args.lora_alpha, model_args.lora_dropout,
                       model_args.lora_target_modules, base_model_name_or_path=model_args.model_name_or_path)
    model.print_trainable_parameters()
    return model, tokenizer, fingerprint


def recipe_fits(path: Optional[str], lengths: Dict[str, int], limit: int) -> bool:
    """Whether the recipe at `path` sets every length in `lengths` to at most `limit`. Only the task's own
    recipe is suggested: another task's recipe would fit the lengths and still be the wrong job."""
    if not path:
        return False
    with open(path, encoding="utf-8") as f:
        recipe = json.load(f)
    return all(name in recipe and recipe[name] <= limit for name in lengths)


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

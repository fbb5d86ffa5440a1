"""The finetuning driver shared by the entry scripts (finetune_generation.py, and later task scripts).

One implementation of what every finetune run needs: a recipe JSON followed by overriding flags, half
precision where Paddle has the kernels, resuming from the last checkpoint, loading the model (with its
length checks and LoRA), THUDM's decay-to-ratio schedule, a resumable shuffle, checkpoint rotation in a
single process, and a clean exit of data-parallel workers. A task script adds its data, its evaluation
and its own argument dataclasses.
"""

import math
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import List, Sequence

import glm  # noqa: F401  (first: sets the CPU thread count before paddle is imported)
import paddle
from paddle.io import DistributedBatchSampler
from paddlenlp.trainer import PdArgumentParser, Trainer, get_last_checkpoint
from paddlenlp.trainer.trainer_utils import IntervalStrategy
from paddlenlp.utils.log import logger

from glm import GLMForConditionalGeneration
from glm.lora import DEFAULT_LORA_TARGETS, apply_lora
from glm.loading import load_model_and_tokenizer
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
    """`RECIPE.json [--flag value ...]` or flags alone; no arguments at all runs `default_argv`."""
    parser = PdArgumentParser(tuple(dataclass_types))
    if not argv:
        logger.info(f"No arguments: running the embedded default {' '.join(os.path.relpath(a) if os.path.exists(a) else a for a in default_argv)}")
        argv = list(default_argv)
    if argv[0].endswith(".json"):  # a recipe, then flags that override it
        if not os.path.isfile(argv[0]):
            raise UserError(f"{argv[0]}: no such recipe file")
        argv = parser.read_json(argv[0]) + list(argv[1:])
    try:
        parsed = parser.common_parse(argv, False)
    except ValueError as error:  # unknown flags, bad values
        raise UserError(str(error).splitlines()[0]) from None
    training_args = parsed[-1]
    if not (training_args.do_train or training_args.do_eval):
        training_args.do_train = training_args.do_eval = True
    if "--evaluation_strategy" not in argv:
        # PaddleNLP turns do_eval into an evaluation every logging_steps; here it means one at the end
        # (evaluation decodes or scores the whole dev set, which costs far more than a loss pass).
        training_args.evaluation_strategy = IntervalStrategy.NO
    return parsed


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


def load_for_training(model_args, dtype, lengths, model_class=GLMForConditionalGeneration, **config_overrides):
    """The model (a `model_class`) and tokenizer, every `lengths` entry ({flag: value}) checked against
    the model's max_sequence_length, and LoRA applied when asked."""
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path,
        dtype,
        model_class=model_class,
        use_flash_attention=model_args.use_flash_attention,
        **config_overrides,
    )
    for name, length in lengths.items():
        if length > model.config.max_sequence_length:
            raise UserError(f"--{name} {length} exceeds the model's max_sequence_length {model.config.max_sequence_length}")
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


def train_and_evaluate(trainer, checkpoint, half_precision=False, eval_before_training=False, extra_files=None):
    """Score the untrained model (if asked), train (resuming `checkpoint`), save the model with
    `extra_files` ({name: JSON value}) beside it, then evaluate; metrics go to *_results.json."""
    args = trainer.args
    if half_precision:
        # Pure half precision: keep the model's explicit float32 softmax/loss casts (autocast would undo them).
        trainer.disable_autocast_context_manager()
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
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
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

"""Supervised finetuning of GLM on source -> target text, driven by the PaddleNLP Trainer.

    python finetune_generation.py                       # the embedded default: tiny GLM, demo data, CPU
    python finetune_generation.py configs/glm-large-chinese.json [--flag value ...]
    python -m paddle.distributed.launch --nproc_per_node 2 finetune_generation.py configs/X.json

Every flag is live: generation flags drive the beam search of evaluation, label_smoothing reaches the
loss, lr_decay_ratio ends the schedule at learning_rate x ratio, LoRA rank/alpha/targets are honoured.
Evaluation decodes the dev set and scores ROUGE-1/2/L and BLEU-4 on jieba words.
"""

import math
import os
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import List, Optional

import glm  # noqa: F401  (first: sets the CPU thread count before paddle is imported)
import paddle
from paddle.io import DistributedBatchSampler
from paddlenlp.datasets import MapDataset
from paddlenlp.trainer import PdArgumentParser, Trainer, TrainingArguments, get_last_checkpoint, set_seed
from paddlenlp.trainer.trainer_utils import IntervalStrategy
from paddlenlp.utils.log import logger
from tqdm import tqdm

from data import DataError, build_examples, find_split_file, read_rows
from glm.generation import GLMGenerator, default_banned_ids, generate_answers
from glm.inputs import MASK_TOKENS, GLMInputBuilder, collate_examples
from glm.lora import DEFAULT_LORA_TARGETS, apply_lora
from glm.loading import CheckpointError, load_model_and_tokenizer
from glm.tokenization import TokenizerError
from utils import (
    GENERATION_SETTINGS,
    GenerationArguments,
    UserError,
    exit_on_user_error,
    generation_metrics,
    write_json_atomic,
    write_jsonl_atomic,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RECIPE = os.path.join(ROOT, "configs", "tiny-default.json")
DEFAULT_OUTPUT = os.path.join(ROOT, "checkpoints", "glm-tiny-chinese")  # where predict_generation.py looks


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
class DataArguments:
    dataset_name_or_path: str = field(
        default=os.path.join(ROOT, "demo_data"),
        metadata={"help": "Directory with train.json and dev.json (JSON Lines; .jsonl too)."},
    )
    src_length: int = field(default=608, metadata={"help": "Source tokens, with [CLS], the mask and <|endoftext|>."})
    tgt_length: int = field(default=160, metadata={"help": "Target tokens, with <|startofpiece|>; also the generation limit."})
    mask_token: str = field(default="[gMASK]", metadata={"help": f"Blank appended to the source: {', '.join(MASK_TOKENS)}."})
    src_key: Optional[str] = field(default=None, metadata={"help": "Source field (default: auto-detected)."})
    tgt_key: Optional[str] = field(default=None, metadata={"help": "Target field (default: auto-detected)."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip and count bad rows instead of stopping."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Decode only the first N dev rows."})
    eval_before_training: bool = field(default=False, metadata={"help": "Score the untrained model first."})


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
    """The PaddleNLP Trainer, plus evaluation by generation and THUDM's decay-to-ratio schedule."""

    def __init__(self, *args, builder, generation_config, eval_rows, lr_decay_ratio, **kwargs):
        super().__init__(*args, **kwargs)
        self.builder = builder
        self.generation_config = generation_config
        self.eval_rows = eval_rows  # (sources, references, rows) for evaluation by generation
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

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval", max_eval_iters=-1):
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix, max_eval_iters
        )
        if self.eval_rows is not None:
            metrics = self.generate_and_score(metric_key_prefix)
            output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in metrics.items()})
        return output

    def generate_and_score(self, prefix: str):
        """Decode the dev sources (each rank a share), gather, score; the main process writes predictions."""
        sources, references, rows = self.eval_rows
        rank, world = self.args.process_index, self.args.world_size
        mine = list(range(rank, len(sources), world))
        generator = GLMGenerator(self.model, self.builder.ids, default_banned_ids(self.model.config, self.tokenizer))
        quiet = self.args.disable_tqdm or rank != 0
        with tqdm(total=len(mine), desc=f"{prefix}: generating", disable=quiet, unit="row") as bar:
            answers = generate_answers(
                generator, self.builder, [sources[i] for i in mine], self.generation_config,
                self.args.per_device_eval_batch_size, progress=bar.update,
            )
        predictions = {i: answer[0][0] for i, answer in zip(mine, answers)}
        if world > 1:
            gathered = []
            paddle.distributed.all_gather_object(gathered, predictions)
            predictions = {i: text for part in gathered for i, text in part.items()}
        ordered = [predictions[i] for i in range(len(sources))]
        if self.args.should_save:
            write_jsonl_atomic(
                os.path.join(self.args.output_dir, f"{prefix}_predictions.jsonl"),
                (dict(row, prediction=text) for row, text in zip(rows, ordered)),
            )
        return generation_metrics(ordered, references)


def parse_arguments(argv):
    parser = PdArgumentParser((ModelArguments, DataArguments, GenerationArguments, TrainingArguments))
    if not argv:
        logger.info(f"No arguments: running the embedded default recipe {os.path.relpath(DEFAULT_RECIPE)}")
        argv = [DEFAULT_RECIPE, "--output_dir", DEFAULT_OUTPUT]
    if argv[0].endswith(".json"):  # a recipe, then flags that override it
        if not os.path.isfile(argv[0]):
            raise UserError(f"{argv[0]}: no such recipe file")
        argv = parser.read_json(argv[0]) + list(argv[1:])
    try:
        model_args, data_args, generation_args, training_args = parser.common_parse(argv, False)
    except ValueError as error:  # unknown flags, bad values
        raise UserError(str(error).splitlines()[0]) from None
    if not (training_args.do_train or training_args.do_eval):
        training_args.do_train = training_args.do_eval = True
    if "--evaluation_strategy" not in argv:
        # PaddleNLP turns do_eval into an evaluation every logging_steps; here it means one at the end
        # (evaluation decodes the dev set, which costs far more than a loss pass).
        training_args.evaluation_strategy = IntervalStrategy.NO
    return model_args, data_args, generation_args, training_args


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


def load_split(data_args, split):
    path = find_split_file(data_args.dataset_name_or_path, split)
    return read_rows(path, data_args.src_key, data_args.tgt_key, skip_bad_rows=data_args.skip_bad_rows)


def run(model_args, data_args, generation_args, training_args, callbacks=()):
    dtype = resolve_amp(training_args)
    checkpoint = last_checkpoint_to_resume(training_args)
    set_seed(training_args.seed)
    generation_config = generation_args.config(data_args.tgt_length, seed=training_args.seed)

    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path,
        dtype,
        label_smoothing=model_args.label_smoothing,
        use_flash_attention=model_args.use_flash_attention,
    )
    for name, length in (("src_length", data_args.src_length), ("tgt_length", data_args.tgt_length)):
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
    try:
        builder = GLMInputBuilder(tokenizer, data_args.src_length, data_args.tgt_length, data_args.mask_token)
    except ValueError as error:
        raise UserError(str(error)) from None

    train_dataset = eval_dataset = eval_rows = None
    if training_args.do_train:
        train_dataset = MapDataset([e.features() for e in build_examples(load_split(data_args, "train"), builder)])
    if training_args.do_eval or data_args.eval_before_training:
        dev = load_split(data_args, "dev")
        if data_args.max_eval_samples:
            dev.rows = dev.rows[: data_args.max_eval_samples]
        eval_dataset = MapDataset([e.features() for e in build_examples(dev, builder)])
        eval_rows = ([r[dev.source_key] for r in dev.rows], [r[dev.target_key] for r in dev.rows], dev.rows)

    trainer = GLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        tokenizer=tokenizer,
        data_collator=partial(collate_examples, pad_id=builder.ids.pad),
        callbacks=list(callbacks),
        builder=builder,
        generation_config=generation_config,
        eval_rows=eval_rows,
        lr_decay_ratio=model_args.lr_decay_ratio,
    )
    if dtype is not None:
        # Pure half precision: keep the model's explicit float32 softmax/loss casts (autocast would undo them).
        trainer.disable_autocast_context_manager()

    if data_args.eval_before_training:
        untrained = trainer.evaluate(metric_key_prefix="untrained")
        trainer.save_metrics("untrained", untrained)
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        if training_args.should_save:
            settings = dict(asdict(generation_args), src_length=data_args.src_length,
                            tgt_length=data_args.tgt_length, mask_token=data_args.mask_token)
            write_json_atomic(os.path.join(training_args.output_dir, GENERATION_SETTINGS), settings)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return trainer


def main(argv=None, callbacks=()):
    with exit_on_user_error(DataError, TokenizerError, CheckpointError):
        arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
        trainer = run(*arguments, callbacks=callbacks)
    if trainer.args.world_size > 1:
        # Data-parallel CPU workers can abort in interpreter teardown after finishing (gloo): leave
        # together and skip the teardown once everything is written.
        paddle.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return trainer


if __name__ == "__main__":
    main()

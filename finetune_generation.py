"""Supervised finetuning of GLM on source -> target text, driven by the PaddleNLP Trainer.

    python finetune_generation.py                       # the embedded default: tiny GLM, demo data, CPU
    python finetune_generation.py configs/glm-large-chinese.json [--flag value ...]
    python -m paddle.distributed.launch --nproc_per_node 2 finetune_generation.py configs/X.json

Every flag is live: generation flags drive the beam search of evaluation, label_smoothing reaches the
loss, lr_decay_ratio ends the schedule at learning_rate x ratio, LoRA rank/alpha/targets are honoured.
Evaluation decodes the dev set and scores ROUGE-1/2/L and BLEU-4 on jieba words.
"""

import os
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Optional

import glm  # noqa: F401  (first: sets the CPU thread count before paddle is imported)
import paddle
from paddlenlp.datasets import MapDataset
from paddlenlp.trainer import TrainingArguments, set_seed

from console import describe_model, progress_bar, shown
from data import build_examples, find_split_file, read_rows
from glm.generation import GLMGenerator, default_banned_ids, generate_answers
from glm.inputs import MASK_TOKENS, GLMInputBuilder, collate_examples
from training import (
    DatasetArguments,
    ROOT,
    GLMTrainer,
    ModelArguments,
    finish,
    last_checkpoint_to_resume,
    load_for_training,
    parse_arguments,
    resolve_amp,
    train_and_evaluate,
)
from utils import (
    GENERATION_SETTINGS,
    GenerationArguments,
    UserError,
    exit_on_user_error,
    generation_metrics,
    write_jsonl_atomic,
)

DEFAULT_RECIPE = os.path.join(ROOT, "configs", "tiny-default.json")
DEFAULT_OUTPUT = os.path.join(ROOT, "checkpoints", "glm-tiny-chinese")  # where predict_generation.py looks
METRIC_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu4": "BLEU-4", "loss": "eval loss"}


@dataclass
class DataArguments(DatasetArguments):
    src_length: int = field(default=608, metadata={"help": "Source tokens, with [CLS], the mask and <|endoftext|>."})
    tgt_length: int = field(default=160, metadata={"help": "Target tokens, with <|startofpiece|>; also the generation limit."})
    mask_token: str = field(default="[gMASK]", metadata={"help": f"Blank appended to the source: {', '.join(MASK_TOKENS)}."})
    src_key: Optional[str] = field(default=None, metadata={"help": "Source field (default: auto-detected)."})
    tgt_key: Optional[str] = field(default=None, metadata={"help": "Target field (default: auto-detected)."})


class GenerationTrainer(GLMTrainer):
    """The shared GLM trainer, plus evaluation by generation (beam search, Chinese ROUGE and BLEU)."""

    def __init__(self, *args, builder, generation_config, eval_rows, **kwargs):
        super().__init__(*args, **kwargs)
        self.builder = builder
        self.generation_config = generation_config
        self.eval_rows = eval_rows  # (sources, references, rows) for evaluation by generation

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
        with progress_bar(len(mine), f"{prefix}: generating", "row", disable=quiet) as bar:
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


def parse_generation_arguments(argv):
    return parse_arguments(
        (ModelArguments, DataArguments, GenerationArguments, TrainingArguments),
        argv,
        default_argv=[DEFAULT_RECIPE, "--output_dir", DEFAULT_OUTPUT],
    )


def load_split(data_args, split):
    path = find_split_file(data_args.dataset_name_or_path, split)
    return read_rows(path, data_args.src_key, data_args.tgt_key, skip_bad_rows=data_args.skip_bad_rows)


def run(model_args, data_args, generation_args, training_args, callbacks=()):
    dtype = resolve_amp(training_args)
    checkpoint = last_checkpoint_to_resume(training_args)
    set_seed(training_args.seed)
    generation_config = generation_args.config(data_args.tgt_length, seed=training_args.seed)

    model, tokenizer = load_for_training(
        model_args,
        dtype,
        {"src_length": data_args.src_length, "tgt_length": data_args.tgt_length},
        task_recipe=DEFAULT_RECIPE,
        label_smoothing=model_args.label_smoothing,
    )
    try:
        builder = GLMInputBuilder(tokenizer, data_args.src_length, data_args.tgt_length, data_args.mask_token)
    except ValueError as error:
        raise UserError(str(error)) from None

    train_dataset = eval_dataset = eval_rows = None
    splits = []
    if training_args.do_train:
        train_dataset = MapDataset([e.features() for e in build_examples(load_split(data_args, "train"), builder)])
        splits.append(f"{len(train_dataset)} train rows")
    if training_args.do_eval or data_args.eval_before_training:
        dev = load_split(data_args, "dev")
        if data_args.max_eval_samples:
            dev.rows = dev.rows[: data_args.max_eval_samples]
        eval_dataset = MapDataset([e.features() for e in build_examples(dev, builder)])
        eval_rows = ([r[dev.source_key] for r in dev.rows], [r[dev.target_key] for r in dev.rows], dev.rows)
        splits.append(f"{len(dev.rows)} dev rows decoded with {generation_config.num_beams} beams")

    trainer = GenerationTrainer(
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
    settings = dict(asdict(generation_args), src_length=data_args.src_length,
                    tgt_length=data_args.tgt_length, mask_token=data_args.mask_token)
    train_and_evaluate(
        trainer, checkpoint, half_precision=dtype is not None, eval_before_training=data_args.eval_before_training,
        extra_files={GENERATION_SETTINGS: settings},
        about={"model": describe_model(model_args, model),
               "data": f"{shown(data_args.dataset_name_or_path)}: {', '.join(splits)}"},
        metric_labels=METRIC_LABELS,
    )
    return trainer


def main(argv=None, callbacks=()):
    with exit_on_user_error():
        arguments = parse_generation_arguments(sys.argv[1:] if argv is None else argv)
        trainer = run(*arguments, callbacks=callbacks)
    return finish(trainer)


if __name__ == "__main__":
    main()

"""Cloze / multiple-choice finetuning of GLM (THUDM's cloze tasks), driven by the PaddleNLP Trainer.

    python finetune_cloze.py                        # the embedded default: tiny GLM, demo_data/cloze, CPU
    python finetune_cloze.py configs/X.json --dataset_name_or_path DIR [--flag value ...]
    python -m paddle.distributed.launch --nproc_per_node 2 finetune_cloze.py configs/X.json

Rows: {"inputs_pretokenized": "...[MASK]...", "choices_pretokenized": [...], "label": i}. Each row is one
packed sequence (glm.inputs.MultipleChoiceBuilder) scored by GLMForMultipleChoice; the loss is the
cross-entropy over the choice scores. Evaluation writes eval_accuracy (%) and eval_loss to
eval_results.json and one row per dev example (prediction, scores) to eval_predictions.jsonl.
The recipe, resume, loading, LoRA and the Trainer are training.py's, as for finetune_generation.py.
"""

import os
import sys
from dataclasses import dataclass, field
from functools import partial

import glm  # noqa: F401  (first: sets the CPU thread count before paddle is imported)
import paddle
from paddlenlp.datasets import MapDataset
from paddlenlp.trainer import TrainingArguments, set_seed
from paddlenlp.trainer.trainer_utils import EvalLoopOutput
from tqdm import tqdm

from data import find_split_file
from glm import GLMForMultipleChoice
from glm.inputs import MultipleChoiceBuilder, collate_multiple_choice
from multiple_choice import build_choice_examples, choice_metrics, prediction_rows, read_choice_rows, score_examples
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
from utils import UserError, exit_on_user_error, write_jsonl_atomic

DEFAULT_RECIPE = os.path.join(ROOT, "configs", "tiny-cloze.json")
DEFAULT_OUTPUT = os.path.join(ROOT, "checkpoints", "glm-tiny-cloze")


@dataclass
class ClozeDataArguments(DatasetArguments):
    dataset_name_or_path: str = field(
        default=os.path.join(ROOT, "demo_data", "cloze"),
        metadata={"help": "Directory with train.json and dev.json (JSON Lines; .jsonl too) in THUDM's format."},
    )
    src_length: int = field(default=512, metadata={"help": "Context tokens, with [CLS], the [MASK] and <|endoftext|>."})


class ClozeTrainer(GLMTrainer):
    """The shared GLM trainer; evaluation scores every dev row's choices (accuracy, loss, predictions)."""

    def __init__(self, *args, eval_examples, eval_rows, pad_id, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_examples, self.eval_rows, self.pad_id = eval_examples, eval_rows, pad_id

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval", max_eval_iters=-1):
        # One scoring pass gives both the accuracy and the loss; the Trainer's loop would concatenate the
        # batches' [B, C] scores padded with -100, which a long choice's log-probability can fall below.
        rank, world = self.args.process_index, self.args.world_size
        mine = list(range(rank, len(self.eval_examples), world))
        with tqdm(total=len(mine), desc=f"{metric_key_prefix}: scoring", unit="row",
                  disable=self.args.disable_tqdm or rank != 0) as bar:
            scores = score_examples(self.model, [self.eval_examples[i] for i in mine],
                                    self.args.per_device_eval_batch_size, self.pad_id, progress=bar.update)
        by_row = dict(zip(mine, scores))
        if world > 1:
            gathered = []
            paddle.distributed.all_gather_object(gathered, by_row)
            by_row = {i: s for part in gathered for i, s in part.items()}
        scores = [by_row[i] for i in range(len(self.eval_examples))]
        if self.args.should_save:
            write_jsonl_atomic(os.path.join(self.args.output_dir, f"{metric_key_prefix}_predictions.jsonl"),
                               prediction_rows(self.eval_rows, scores))
        metrics = choice_metrics(scores, [row["label"] for row in self.eval_rows])
        return EvalLoopOutput(
            predictions=None, label_ids=None, num_samples=len(scores),
            metrics={f"{metric_key_prefix}_{name}": value for name, value in metrics.items()},
        )


def parse_cloze_arguments(argv):
    return parse_arguments(
        (ModelArguments, ClozeDataArguments, TrainingArguments),
        argv,
        default_argv=[DEFAULT_RECIPE, "--output_dir", DEFAULT_OUTPUT],
    )


def load_split(data_args, split, builder):
    path = find_split_file(data_args.dataset_name_or_path, split)
    rows = read_choice_rows(path, skip_bad_rows=data_args.skip_bad_rows)
    if split == "dev" and data_args.max_eval_samples:
        rows = rows[: data_args.max_eval_samples]
    return rows, build_choice_examples(rows, builder, os.path.basename(path))


def run(model_args, data_args, training_args, callbacks=()):
    dtype = resolve_amp(training_args)
    checkpoint = last_checkpoint_to_resume(training_args)
    set_seed(training_args.seed)
    model, tokenizer = load_for_training(
        model_args, dtype, {"src_length": data_args.src_length}, model_class=GLMForMultipleChoice,
        task_recipe=DEFAULT_RECIPE,
    )
    try:
        builder = MultipleChoiceBuilder(tokenizer, data_args.src_length)
    except ValueError as error:
        raise UserError(str(error)) from None

    train_dataset = eval_dataset = None
    eval_rows, eval_examples = [], []
    if training_args.do_train:
        train_dataset = MapDataset([e.features() for e in load_split(data_args, "train", builder)[1]])
    if training_args.do_eval or data_args.eval_before_training:
        eval_rows, eval_examples = load_split(data_args, "dev", builder)
        eval_dataset = MapDataset([e.features() for e in eval_examples])

    trainer = ClozeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        tokenizer=tokenizer,
        data_collator=partial(collate_multiple_choice, pad_id=builder.ids.pad),
        callbacks=list(callbacks),
        eval_examples=eval_examples,
        eval_rows=eval_rows,
        pad_id=builder.ids.pad,
        lr_decay_ratio=model_args.lr_decay_ratio,
    )
    train_and_evaluate(
        trainer, checkpoint, half_precision=dtype is not None, eval_before_training=data_args.eval_before_training
    )
    return trainer


def main(argv=None, callbacks=()):
    with exit_on_user_error():
        arguments = parse_cloze_arguments(sys.argv[1:] if argv is None else argv)
        trainer = run(*arguments, callbacks=callbacks)
    return finish(trainer)


if __name__ == "__main__":
    main()

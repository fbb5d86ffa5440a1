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

from data import build_examples, read_rows
from glm.cli.console import shown
from glm.cli.process import command
from glm.generation import rows_per_source
from glm.generation_settings import GENERATION_SETTINGS, GenerationArguments, strategy_in_brief
from glm.inputs import MASK_TOKENS, GLMInputBuilder, collate_examples
from glm.jsonl import find_split_file
from glm.memory.estimate import DecodingLoad
from glm.prediction import EMBEDDED_DEFAULT_MODEL
from glm.training.arguments import DatasetArguments, ModelArguments, parse_arguments
from glm.training.run_record import data_fingerprint, model_fingerprint
from glm.training.task import Task, TaskData, finish, run_task
from paddlenlp.datasets import MapDataset
from paddlenlp.trainer import TrainingArguments
from utils import GenerationTrainer

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RECIPE = os.path.join(ROOT, "configs", "tiny-default.json")
DEFAULT_OUTPUT = os.path.join(ROOT, EMBEDDED_DEFAULT_MODEL)  # where predict_generation.py and server.py look
DEFAULTS = {"model_name_or_path": os.path.join(ROOT, "configs", "glm-tiny-chinese"),
            "dataset_name_or_path": os.path.join(ROOT, "demo_data"),
            "label_smoothing": 0.1}  # THUDM's glm-large-chinese recipe
METRIC_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu4": "BLEU-4", "loss": "eval loss"}


@dataclass
class DataArguments(DatasetArguments):
    src_length: int = field(default=608, metadata={"help": "Source tokens, with [CLS], the mask and <|endoftext|>."})
    tgt_length: int = field(default=160, metadata={"help": "Target tokens, with <|startofpiece|>; also the generation limit."})
    mask_token: str = field(default="[gMASK]", metadata={"help": f"Blank appended to the source: {', '.join(MASK_TOKENS)}."})
    src_key: Optional[str] = field(default=None, metadata={"help": "Source field (default: auto-detected)."})
    tgt_key: Optional[str] = field(default=None, metadata={"help": "Target field (default: auto-detected)."})


def parse_generation_arguments(argv):
    return parse_arguments(
        (ModelArguments, DataArguments, GenerationArguments, TrainingArguments),
        argv,
        default_argv=[DEFAULT_RECIPE, "--output_dir", DEFAULT_OUTPUT],
        defaults=DEFAULTS,
        lengths=("src_length", "tgt_length"),
        checkpoint_settings=True,
    )


def load_split(data_args, split):
    path = find_split_file(data_args.dataset_name_or_path, split)
    return read_rows(path, data_args.src_key, data_args.tgt_key, skip_bad_rows=data_args.skip_bad_rows)


class GenerationTask(Task):
    """Source -> target finetuning; evaluation decodes the dev set (GenerationTrainer)."""

    trainer_class = GenerationTrainer
    metric_labels = METRIC_LABELS

    def __init__(self, model_args, data_args, generation_args, training_args, given_flags=frozenset(),
                 default_recipe=DEFAULT_RECIPE):
        super().__init__(model_args, training_args, given_flags)
        self.data_args, self.generation_args, self.default_recipe = data_args, generation_args, default_recipe

    def prepare(self):
        self.generation_config = self.generation_args.config(self.data_args.tgt_length, seed=self.training_args.seed)

    def recorded_arguments(self):
        return (self.data_args,)  # the decoding flags (generation_args) only reach evaluation

    def inputs(self):
        return {"model_name_or_path": model_fingerprint(self.model_args.model_name_or_path),
                "dataset_name_or_path": data_fingerprint(self.data_args.dataset_name_or_path)}

    def lengths(self):
        return {"src_length": self.data_args.src_length, "tgt_length": self.data_args.tgt_length}

    def config_overrides(self):
        return {"label_smoothing": self.model_args.label_smoothing}

    def eval_before_training(self):
        return self.data_args.eval_before_training

    def row_tokens(self):
        return self.data_args.src_length + self.data_args.tgt_length, self.data_args.tgt_length

    def evaluation_decoding(self, shape):
        return DecodingLoad(shape, self.training_args.per_device_eval_batch_size, self.data_args.src_length,
                            self.data_args.tgt_length, rows_per_source(self.generation_config))

    def data(self, tokenizer) -> TaskData:
        data_args, training_args = self.data_args, self.training_args
        builder = GLMInputBuilder(tokenizer, data_args.src_length, data_args.tgt_length, data_args.mask_token)
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
            splits.append(f"{len(dev.rows)} dev rows decoded by {strategy_in_brief(self.generation_config)}")
        settings = dict(asdict(self.generation_args), src_length=data_args.src_length, tgt_length=data_args.tgt_length,
                        mask_token=data_args.mask_token)
        return TaskData(
            train_dataset, eval_dataset, partial(collate_examples, pad_id=builder.ids.pad),
            trainer_arguments=dict(builder=builder, generation_config=self.generation_config, eval_rows=eval_rows),
            about={"data": f"{shown(data_args.dataset_name_or_path)}: {', '.join(splits)}"},
            extra_files={GENERATION_SETTINGS: settings},
        )


def run(model_args, data_args, generation_args, training_args, callbacks=(), given_flags=frozenset(),
        default_recipe=DEFAULT_RECIPE):
    task = GenerationTask(model_args, data_args, generation_args, training_args, given_flags, default_recipe)
    return run_task(task, callbacks)


def main(argv=None, callbacks=()):
    with command():
        arguments = parse_generation_arguments(sys.argv[1:] if argv is None else argv)
        trainer = run(*arguments, callbacks=callbacks, given_flags=arguments.given_flags,
                      default_recipe=arguments.recipe_to_suggest(DEFAULT_RECIPE))
    return finish(trainer)


if __name__ == "__main__":
    main()

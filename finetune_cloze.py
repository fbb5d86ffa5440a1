"""Cloze / multiple-choice finetuning of GLM (THUDM's cloze tasks), driven by the PaddleNLP Trainer.

    python finetune_cloze.py                        # the embedded default: tiny GLM, demo_data/cloze, CPU
    python finetune_cloze.py configs/X.json --dataset_name_or_path DIR [--flag value ...]
    python -m paddle.distributed.launch --nproc_per_node 2 finetune_cloze.py configs/X.json

Rows: {"inputs_pretokenized": "...[MASK]...", "choices_pretokenized": [...], "label": i}. Each row is one
packed sequence (glm.inputs.MultipleChoiceBuilder) scored by GLMForMultipleChoice; the loss is the
cross-entropy over the choice scores. Evaluation writes eval_accuracy (%) and eval_loss to
eval_results.json and one row per dev example (prediction, scores) to eval_predictions.jsonl.
The recipe, resume, loading, LoRA and the Trainer are glm.training's task skeleton, as for
finetune_generation.py.
"""

import os
import sys

from glm.cli.process import command
from glm.training.arguments import ModelArguments, parse_arguments
from glm.training.task import finish
from glm.understanding.cloze import ClozeDataArguments, PTuningArguments, finetune_cloze
from paddlenlp.trainer import TrainingArguments

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RECIPE = os.path.join(ROOT, "configs", "tiny-cloze.json")
DEFAULT_OUTPUT = os.path.join(ROOT, "checkpoints", "glm-tiny-cloze")
DEFAULTS = {"model_name_or_path": os.path.join(ROOT, "configs", "glm-tiny-chinese"),
            "dataset_name_or_path": os.path.join(ROOT, "demo_data", "cloze")}


def parse_cloze_arguments(argv):
    return parse_arguments(
        (ModelArguments, ClozeDataArguments, PTuningArguments, TrainingArguments),
        argv,
        default_argv=[DEFAULT_RECIPE, "--output_dir", DEFAULT_OUTPUT],
        defaults=DEFAULTS,
        lengths=("src_length",),
    )


def main(argv=None, callbacks=()):
    with command():
        arguments = parse_cloze_arguments(sys.argv[1:] if argv is None else argv)
        model_args, data_args, ptuning_args, training_args = arguments
        trainer = finetune_cloze(model_args, data_args, training_args, callbacks=callbacks, given_flags=arguments.given_flags,
                                 task_recipe=arguments.recipe_to_suggest(DEFAULT_RECIPE), ptuning_args=ptuning_args)
    return finish(trainer)


if __name__ == "__main__":
    main()

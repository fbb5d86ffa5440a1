"""Pretrain GLM with its autoregressive blank-infilling objective (THUDM's), driven by the PaddleNLP Trainer.

    python pretrain_glm.py                          # the embedded default: tiny GLM, a corpus of demo_data, CPU
    python pretrain_glm.py configs/X.json --corpus_dir DIR --eval_corpus_dir DIR [--flag value ...]
    python pretrain_glm.py ... --dump_examples examples.jsonl --dump_count 20   # what training would see
    python -m paddle.distributed.launch --nproc_per_node 2 pretrain_glm.py configs/X.json ...

Corpora are prepared once with tools/prepare_pretraining_data.py. The model directory may hold no weights
(random init: from scratch) or be any GLM checkpoint (continued pretraining). Evaluation reports the held-
out loss per objective (eval_loss_token, eval_loss_sentence, eval_loss_document) in eval_results.json.
"""

import os
import sys

from glm.cli.process import command
from glm.pretraining.objective import PretrainingArguments
from glm.pretraining.pretrain import CorpusArguments, prepare_on_demand, pretrain
from glm.training.arguments import ModelArguments, parse_arguments
from glm.training.task import finish
from paddlenlp.trainer import TrainingArguments

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RECIPE = os.path.join(ROOT, "configs", "tiny-pretrain.json")
DEFAULT_OUTPUT = os.path.join(ROOT, "checkpoints", "glm-tiny-pretrain")
DEFAULTS = {"model_name_or_path": os.path.join(ROOT, "configs", "glm-tiny-chinese"), "label_smoothing": 0.0}
# The embedded default's corpora: the ad copy of demo_data, prepared on first use (and again if it changes).
DEMO_CORPORA = {os.path.join(ROOT, "checkpoints", "corpora", f"demo-{split}"): os.path.join(ROOT, "demo_data", f"{split}.json")
                for split in ("train", "dev")}


def parse_pretraining_arguments(argv):
    train_corpus, dev_corpus = DEMO_CORPORA
    return parse_arguments(
        (ModelArguments, CorpusArguments, PretrainingArguments, TrainingArguments),
        argv,
        default_argv=[DEFAULT_RECIPE, "--output_dir", DEFAULT_OUTPUT, "--corpus_dir", train_corpus,
                      "--eval_corpus_dir", dev_corpus],
        defaults=DEFAULTS,
    )


def main(argv=None, callbacks=()):
    with command():
        arguments = parse_pretraining_arguments(sys.argv[1:] if argv is None else argv)
        model_args, corpus_args, objective_args, training_args = arguments
        trainer = pretrain(model_args, corpus_args, objective_args, training_args, callbacks=callbacks,
                           task_recipe=arguments.recipe_to_suggest(DEFAULT_RECIPE), given_flags=arguments.given_flags,
                           prepare=lambda tokenizer: prepare_on_demand(DEMO_CORPORA, "summary", tokenizer, corpus_args,
                                                                       training_args))
    return finish(trainer) if trainer is not None else None


if __name__ == "__main__":
    main()

"""Cloze finetuning (THUDM's cloze tasks) on the task skeleton (glm.training.task): rows in THUDM's
multiple-choice format, one packed sequence each (MultipleChoiceBuilder) scored by GLMForMultipleChoice,
the loss the cross-entropy over the choice scores. Evaluation scores every dev row's choices, which gives the
accuracy, the loss and per-row predictions in one pass."""

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import paddle
from paddlenlp.datasets import MapDataset
from paddlenlp.trainer.trainer_utils import EvalLoopOutput

from ..cli.console import progress_bar, shown
from ..errors import UserError
from ..files import write_jsonl_atomic
from ..bounds import COUNT, check_flag
from ..inputs import PROMPT_PLACEMENTS, MultipleChoiceBuilder, collate_multiple_choice
from ..jsonl import find_split_file
from ..lora import base_fingerprint
from ..modeling import GLMForMultipleChoice
from ..ptuning import PROMPT_ENCODERS, PromptConfig, PromptTunedModel, prompt_parameters
from ..training.arguments import DatasetArguments
from ..training.run_record import data_fingerprint, model_fingerprint
from ..training.task import Task, TaskData, refuse_weightless_base, run_task
from ..training.trainer import GLMTrainer
from .multiple_choice import build_choice_examples, choice_metrics, prediction_rows, read_choice_rows, score_examples

__all__ = ["ClozeDataArguments", "PTuningArguments", "ClozeTrainer", "ClozeTask", "finetune_cloze", "PLANNED_CHOICE_TOKENS"]

PLANNED_CHOICE_TOKENS = 32  # the memory plan's choice tokens a row (all its choices packed together)


@dataclass
class ClozeDataArguments(DatasetArguments):
    dataset_name_or_path: Optional[str] = field(  # default: the task script's (parse_arguments' `defaults`)
        default=None,
        metadata={"help": "Directory with train.json and dev.json (JSON Lines; .jsonl too) in THUDM's format."},
    )
    src_length: int = field(default=512, metadata={"help": "Context tokens, with [CLS], the [MASK] and <|endoftext|>."})


@dataclass
class PTuningArguments:
    """THUDM's P-tuning (glm/ptuning.py): continuous prompt tokens in each row's pattern."""

    ptuning: bool = field(default=False, metadata={"help": "THUDM's P-tuning: continuous prompt tokens in the cloze pattern."})
    num_prompt_tokens: int = field(default=8, metadata={"help": "Prompt tokens per row (--ptuning)."})
    prompt_encoder: str = field(
        default="lstm", metadata={"help": f"THUDM's PromptSpell: {' | '.join(PROMPT_ENCODERS)} (a 2-layer bidirectional "
                                          "LSTM then an MLP, an MLP, or the trainable vectors as they are)."})
    prompt_placement: str = field(
        default="split", metadata={"help": "Where the prompt tokens go: split (half after [CLS], half just before the "
                                           "blank), start (after [CLS]) or blank (just before the blank)."})
    freeze_backbone: bool = field(
        default=False, metadata={"help": "Train only the prompt (THUDM's --freeze-transformer); only it is saved."})

    def check(self, model_args, src_length: int):
        if not self.ptuning:
            defaults = PTuningArguments()
            given = [f"--{name}" for name in ("num_prompt_tokens", "prompt_encoder", "prompt_placement", "freeze_backbone")
                     if getattr(self, name) != getattr(defaults, name)]  # fmt: skip
            if given:
                raise UserError(f"{given[0]} applies to --ptuning true")
            return
        check_flag("num_prompt_tokens", self.num_prompt_tokens, COUNT)
        if self.prompt_encoder not in PROMPT_ENCODERS:
            raise UserError(f"--prompt_encoder must be one of {', '.join(PROMPT_ENCODERS)}; got {self.prompt_encoder}")
        if self.prompt_placement not in PROMPT_PLACEMENTS:
            raise UserError(f"--prompt_placement must be one of {', '.join(PROMPT_PLACEMENTS)}; got {self.prompt_placement}")
        if model_args.lora or model_args.prefix_tuning:
            raise UserError("--ptuning with --lora or --prefix_tuning: choose one way to adapt the model")
        if src_length < self.num_prompt_tokens + 3:
            raise UserError(f"--src_length {src_length} cannot hold --num_prompt_tokens {self.num_prompt_tokens} with "
                            "[CLS], the blank and <|endoftext|>")
        if self.freeze_backbone:
            refuse_weightless_base("--ptuning --freeze_backbone", model_args.model_name_or_path, "prompt",
                                   "and prompt-tune that")


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
        with progress_bar(len(mine), f"{metric_key_prefix}: scoring", "row",
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


def load_split(data_args, split, builder):
    path = find_split_file(data_args.dataset_name_or_path, split)
    rows = read_choice_rows(path, skip_bad_rows=data_args.skip_bad_rows)
    if split == "dev" and data_args.max_eval_samples:
        rows = rows[: data_args.max_eval_samples]
    return rows, build_choice_examples(rows, builder, os.path.basename(path))


class ClozeTask(Task):
    """Cloze finetuning on the task skeleton: GLMForMultipleChoice on rows in THUDM's multiple-choice format."""

    model_class = GLMForMultipleChoice
    trainer_class = ClozeTrainer

    def __init__(self, model_args, data_args, training_args, given_flags=frozenset(), default_recipe=None,
                 ptuning_args: Optional[PTuningArguments] = None):
        super().__init__(model_args, training_args, given_flags)
        self.data_args, self.default_recipe = data_args, default_recipe
        self.ptuning_args = ptuning_args or PTuningArguments()

    def prepare(self):
        self.ptuning_args.check(self.model_args, self.data_args.src_length)
        if self.model_args.label_smoothing:
            # THUDM's cloze finetuning (finetune_glm.py) takes the plain cross-entropy over the choice
            # scores; smoothing there would be a regulariser with nothing to check it against.
            raise UserError(f"--label_smoothing {self.model_args.label_smoothing}: it applies to generation's token "
                            "loss (finetune_generation.py); the choice loss is THUDM's plain cross-entropy, so leave it at 0")

    def recorded_arguments(self):
        return (self.data_args, self.ptuning_args)

    def adapter_parameters(self, shape):
        if self.ptuning_args.ptuning and self.ptuning_args.freeze_backbone:
            return prompt_parameters(self.ptuning_args.num_prompt_tokens, shape.hidden_size, self.ptuning_args.prompt_encoder)
        return super().adapter_parameters(shape)

    def adapt_model(self, model, base):
        if not self.ptuning_args.ptuning:
            return model, base
        args = self.ptuning_args
        config = PromptConfig(args.num_prompt_tokens, args.prompt_encoder, args.prompt_placement,
                              model.config.hidden_size, args.freeze_backbone)
        fingerprint = base_fingerprint(self.model_args.model_name_or_path, model.config) if args.freeze_backbone else None
        return PromptTunedModel(model, config), fingerprint

    def inputs(self):
        return {"model_name_or_path": model_fingerprint(self.model_args.model_name_or_path),
                "dataset_name_or_path": data_fingerprint(self.data_args.dataset_name_or_path)}

    def lengths(self):
        return {"src_length": self.data_args.src_length}

    def eval_before_training(self):
        return self.data_args.eval_before_training

    def row_tokens(self):
        # The choices are packed after the context; before the data is read, THUDM's tasks' at most.
        return self.data_args.src_length + PLANNED_CHOICE_TOKENS, PLANNED_CHOICE_TOKENS

    def data(self, tokenizer) -> TaskData:
        prompt = self.ptuning_args
        builder = MultipleChoiceBuilder(tokenizer, self.data_args.src_length, prompt.num_prompt_tokens if prompt.ptuning else 0,
                                        prompt.prompt_placement)
        train_dataset = eval_dataset = None
        eval_rows, eval_examples, splits = [], [], []
        if self.training_args.do_train:
            train_dataset = MapDataset([e.features() for e in load_split(self.data_args, "train", builder)[1]])
            splits.append(f"{len(train_dataset)} train rows")
        if self.training_args.do_eval or self.data_args.eval_before_training:
            eval_rows, eval_examples = load_split(self.data_args, "dev", builder)
            eval_dataset = MapDataset([e.features() for e in eval_examples])
            splits.append(f"{len(eval_rows)} dev rows scored")
        about = {"data": f"{shown(self.data_args.dataset_name_or_path)}: {', '.join(splits)}"}
        if prompt.ptuning:
            about["prompt"] = (f"THUDM's P-tuning: {prompt.num_prompt_tokens} prompt tokens ({prompt.prompt_placement}), "
                               f"encoder {prompt.prompt_encoder}, " + ("backbone frozen" if prompt.freeze_backbone else "backbone trained"))
        return TaskData(
            train_dataset, eval_dataset, partial(collate_multiple_choice, pad_id=builder.ids.pad),
            trainer_arguments=dict(eval_examples=eval_examples, eval_rows=eval_rows, pad_id=builder.ids.pad), about=about,
        )


def finetune_cloze(model_args, data_args, training_args, callbacks=(), task_recipe: Optional[str] = None,
                   given_flags=frozenset(), ptuning_args: Optional[PTuningArguments] = None):
    """Load, build the rows, train and evaluate on the task skeleton (glm.training.task.run_task);
    `task_recipe` is the task's embedded default recipe, suggested when a length does not fit the model;
    `given_flags`, the flags the user typed."""
    return run_task(ClozeTask(model_args, data_args, training_args, given_flags, task_recipe, ptuning_args), callbacks)

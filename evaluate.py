"""Evaluate a GLM checkpoint on understanding tasks, as THUDM's evaluation scripts do.

    python evaluate.py --task multiple_choice --model_name_or_path CKPT --data_file dev.json --output_file results.json
    python evaluate.py --task lm --model_name_or_path CKPT --data_file text.txt --overlapping_eval 32
    python evaluate.py --task lambada --model_name_or_path CKPT --data_file words.txt

multiple_choice  THUDM's zero-shot rows {"inputs_pretokenized", "choices_pretokenized", "label"}: each
                 choice scored by its summed log-probability; `accuracy` (%), per-row predictions.
lm               plain text, one document per line, THUDM's LMDataset windows: `perplexity`, `loss`
                 (mean token negative log-likelihood) and `tokens` scored.
lambada          lines of space-separated words, the last word the answer: `accuracy` (%), right iff
                 every answer token is the argmax given the true earlier ones (teacher-forced).
Results are printed and, with --output_file, written as JSON (atomically); per-row predictions go to
--predictions_file (default: beside the output file).
"""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from glm import GLMForConditionalGeneration, GLMForMultipleChoice
from glm.bounds import COUNT, check_flag, check_lengths
from glm.cli.arguments import flag_names, parse_flags
from glm.cli.console import progress_bar
from glm.cli.process import command
from glm.errors import DataError, UserError
from glm.files import write_json_atomic, write_jsonl_atomic
from glm.inputs import MASK_TOKENS, MultipleChoiceBuilder
from glm.loading import load_model_and_tokenizer
from glm.ptuning import builder_prompt, has_prompt
from glm.tokenization import special_token_ids
from glm.understanding.language_model import lambada_examples, lm_examples, lm_metrics, score_targets
from glm.understanding.multiple_choice import (
    build_choice_examples,
    choice_metrics,
    prediction_rows,
    read_choice_rows,
    score_examples,
)

TASKS = ("multiple_choice", "lm", "lambada")
# The flags only some tasks read: given to another task they would be ignored without a word.
TASK_FLAGS = {
    "src_length": ("multiple_choice",), "skip_bad_rows": ("multiple_choice",), "prompt_path": ("multiple_choice",),
    "predictions_file": ("multiple_choice", "lambada"), "seq_length": ("lm", "lambada"), "mask_token": ("lm", "lambada"),
    "overlapping_eval": ("lm",), "unidirectional": ("lm",), "word_separator": ("lambada",),
}  # fmt: skip
DESCRIPTION = (
    "Score a GLM checkpoint (and a LoRA adapter trained on it) on an understanding task, as THUDM's evaluation "
    "does: multiple_choice (THUDM's rows: accuracy by each choice's summed log-probability), lm (perplexity over "
    "windows of plain text) or lambada (last-word accuracy). Length flags default to the model's maximum."
)


@dataclass
class EvaluateArguments:
    task: str = field(default="multiple_choice", metadata={"help": f"One of {', '.join(TASKS)}."})
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "GLM checkpoint directory (required)."})
    data_file: Optional[str] = field(default=None, metadata={"help": "The data to evaluate on (required)."})
    lora_path: Optional[str] = field(default=None, metadata={"help": "LoRA adapter directory to apply."})
    prefix_path: Optional[str] = field(default=None, metadata={"help": "P-tuning v2 prefix directory (--prefix_tuning's output) to apply."})
    prompt_path: Optional[str] = field(
        default=None, metadata={"help": "multiple_choice: THUDM P-tuning prompt (finetune_cloze.py --ptuning --freeze_backbone's "
                                        "output) to apply; a --ptuning run that trained its backbone is its own model, prompt included."})
    force: bool = field(default=False, metadata={"help": "Apply an adapter or prefix recorded for another same-shaped base."})
    output_file: Optional[str] = field(default=None, metadata={"help": "Write the results here as JSON."})
    predictions_file: Optional[str] = field(
        default=None, metadata={"help": "Per-row predictions of multiple_choice and lambada, JSON Lines (default: the --output_file's name with .predictions.jsonl for its extension: results.json -> results.predictions.jsonl)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Rows (or windows) per forward pass."})
    src_length: Optional[int] = field(
        default=None, metadata={"help": "multiple_choice: context tokens with [CLS], [MASK], <|endoftext|> (default: the model's max)."}
    )
    seq_length: Optional[int] = field(default=None, metadata={"help": "lm/lambada: window length (default: the model's max)."})
    overlapping_eval: Optional[int] = field(default=None, metadata={"help": "lm: window stride (default: a whole window)."})
    unidirectional: bool = field(default=False, metadata={"help": "lm: later windows see one prompt token, causally."})
    mask_token: str = field(default="[MASK]", metadata={"help": "lm/lambada: the blank ([MASK], or [gMASK] as THUDM's --task-mask)."})
    word_separator: str = field(default="", metadata={"help": "lambada: joins the context words (\"\" for Chinese, \" \" for English)."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "multiple_choice: skip and count bad rows."})


def check_arguments(args, given=frozenset()):
    """`given`: the flags the user typed (a flag of another task is refused)."""
    if args.task not in TASKS:
        raise UserError(f"--task must be one of {', '.join(TASKS)}; got {args.task}")
    for name in sorted(given):
        if args.task not in TASK_FLAGS.get(name, TASKS):
            raise UserError(f"--{name} applies to --task {' and '.join(TASK_FLAGS[name])}, not to --task {args.task}")
    for name in ("model_name_or_path", "data_file"):
        if not getattr(args, name):
            raise UserError(f"--{name} is required")
    if not os.path.isfile(args.data_file):
        raise UserError(f"{args.data_file}: no such file")
    if args.mask_token not in MASK_TOKENS:
        raise UserError(f"--mask_token must be one of {', '.join(MASK_TOKENS)}; got {args.mask_token}")
    check_flag("batch_size", args.batch_size, COUNT)


def load(args):
    """The model as the task scores with it, the adapter verified against its base (the one loader)."""
    model_class = GLMForMultipleChoice if args.task == "multiple_choice" else GLMForConditionalGeneration
    prompt_path = args.prompt_path or (args.model_name_or_path if has_prompt(args.model_name_or_path) else None)
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, model_class=model_class,
                                                lora_path=args.lora_path, prefix_path=args.prefix_path,
                                                prompt_path=prompt_path, force=args.force)
    model.eval()
    return model, tokenizer


def model_length(name: str, value: Optional[int], model) -> int:
    """`value` of length flag `name`, the model's max_sequence_length when not given, checked."""
    length = model.config.max_sequence_length if value is None else value
    check_lengths({name: length}, model.config.max_sequence_length)
    return length


def evaluate_multiple_choice(args, model, tokenizer):
    src_length = model_length("src_length", args.src_length, model)
    # a P-tuning prompt's tokens go into each row's pattern
    builder = MultipleChoiceBuilder(tokenizer, src_length, **builder_prompt(getattr(model, "prompt_config", None)))
    rows = read_choice_rows(args.data_file, skip_bad_rows=args.skip_bad_rows)
    examples = build_choice_examples(rows, builder, os.path.basename(args.data_file))
    with progress_bar(len(examples), "scoring", "row") as bar:
        scores = score_examples(model, examples, args.batch_size, builder.ids.pad, progress=bar.update)
    metrics = choice_metrics(scores, [row["label"] for row in rows])
    return {"accuracy": metrics["accuracy"], "rows": len(rows)}, prediction_rows(rows, scores)


def read_lines(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not lines:
        raise DataError(f"{path}: no lines to score ({'the file is empty' if not text else 'the file holds only whitespace'})")
    return lines


def evaluate_lm(args, model, tokenizer):
    seq_length = model_length("seq_length", args.seq_length, model)
    if args.overlapping_eval is not None:
        check_flag("overlapping_eval", args.overlapping_eval, COUNT, high=seq_length - 1, high_is="seq_length - 1")
    lines = (line for _, line in read_lines(args.data_file))
    examples = lm_examples(tokenizer, lines, seq_length, args.overlapping_eval, args.unidirectional, args.mask_token)
    if not examples:
        raise DataError(f"{args.data_file}: no line has two tokens to score")
    with progress_bar(len(examples), "scoring windows", "window") as bar:
        results = score_targets(model, examples, args.batch_size, special_token_ids(tokenizer).pad, progress=bar.update)
    return dict(lm_metrics(results), windows=len(examples)), None


def evaluate_lambada(args, model, tokenizer):
    seq_length = model_length("seq_length", args.seq_length, model)
    rows, examples = lambada_examples(
        tokenizer, read_lines(args.data_file), seq_length, os.path.basename(args.data_file), args.mask_token,
        args.word_separator,
    )
    with progress_bar(len(examples), "scoring", "row") as bar:
        results = score_targets(model, examples, args.batch_size, special_token_ids(tokenizer).pad, progress=bar.update)
    correct = [hit for _, _, hit in results]
    metrics = {"accuracy": round(100.0 * sum(correct) / len(correct), 4), "rows": len(correct)}
    return metrics, (dict(row, correct=hit) for row, hit in zip(rows, correct))


def evaluate(args, given=frozenset()):
    check_arguments(args, given)
    model, tokenizer = load(args)
    task = {"multiple_choice": evaluate_multiple_choice, "lm": evaluate_lm, "lambada": evaluate_lambada}[args.task]
    metrics, predictions = task(args, model, tokenizer)
    results = dict(task=args.task, **metrics)
    if predictions is not None and (args.predictions_file or args.output_file):
        path = args.predictions_file or os.path.splitext(args.output_file)[0] + ".predictions.jsonl"
        write_jsonl_atomic(path, predictions)
    if args.output_file:
        write_json_atomic(args.output_file, results)
    print(json.dumps(results, ensure_ascii=False))
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with command():
        (args,) = parse_flags((EvaluateArguments,), argv, description=DESCRIPTION)
        return evaluate(args, flag_names(argv))


if __name__ == "__main__":
    main()

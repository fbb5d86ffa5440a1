"""Multiple-choice / cloze data and scoring, shared by finetune_cloze.py and evaluate.py.

Rows are in THUDM's zero-shot format (JSON Lines):

    {"inputs_pretokenized": "context with a [MASK]", "choices_pretokenized": ["choice 1", "choice 2"], "label": 0}

`label` (the index of the right choice) is required for training and scoring. A bad row stops with one
line `FILE:LINE: what is wrong` (a DataError), or with `skip_bad_rows` is dropped and counted.
"""

import math
import unicodedata
from typing import Callable, List, Optional

import paddle
from paddlenlp.utils.log import logger

from ..errors import DataError
from ..inputs import BLANK, MultipleChoiceBuilder, MultipleChoiceExample, collate_multiple_choice
from ..jsonl import read_json_lines

__all__ = ["read_choice_rows", "build_choice_examples", "score_examples", "choice_metrics", "prediction_rows"]

CONTEXT, CHOICES, LABEL = "inputs_pretokenized", "choices_pretokenized", "label"


def read_choice_rows(path: str, need_label: bool = True, skip_bad_rows: bool = False) -> List[dict]:
    def check_row(row, where):
        context = row.get(CONTEXT)
        if not isinstance(context, str) or not context.strip():
            raise DataError(f"{where}: {CONTEXT!r} must be a non-empty string")
        choices = row.get(CHOICES)
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"{where}: {CHOICES!r} must be a list of at least two strings")
        for number, choice in enumerate(choices):
            if not isinstance(choice, str) or not choice.strip():
                raise DataError(f"{where}: choice {number} must be a non-empty string")
        # As the tokenizer reads them (NFKC): two equal choices tie, and float noise picks the winner.
        seen = {}
        for number, choice in enumerate(choices):
            first = seen.setdefault(unicodedata.normalize("NFKC", choice).strip(), number)
            if first != number:
                raise DataError(f"{where}: choices {first} and {number} are the same ({choice!r}); each must differ")
        blanks = BLANK.findall(context)
        if len(blanks) > 1:
            raise DataError(f"{where}: {CONTEXT!r} holds {len(blanks)} blanks ({', '.join(blanks)}); a choice fills one")
        if LABEL in row or need_label:
            label = row.get(LABEL)
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
                raise DataError(f"{where}: {LABEL!r} must be a choice index 0..{len(choices) - 1}, got {label!r}")

    return read_json_lines(path, check_row, skip_bad_rows)[0]


def build_choice_examples(rows: List[dict], builder: MultipleChoiceBuilder, name: str) -> List[MultipleChoiceExample]:
    examples = []
    for number, row in enumerate(rows, start=1):
        try:
            examples.append(builder.build(row[CONTEXT], row[CHOICES], row.get(LABEL)))
        except ValueError as error:
            raise DataError(f"{name}: row {number}: {error}") from None
    cut = sum(e.context_truncated for e in examples)
    if cut:
        logger.warning(f"{name}: {cut} of {len(examples)} contexts cut to src_length={builder.src_length} tokens")
    return examples


@paddle.no_grad()
def score_examples(model, examples: List[MultipleChoiceExample], batch_size: int, pad_id: int,
                   progress: Optional[Callable[[int], None]] = None) -> List[List[float]]:
    """Per example, the score (summed log-probability) of each of its choices, in evaluation mode."""
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate_multiple_choice([e.features() for e in chunk], pad_id)
        batch.pop("labels", None)
        inputs = {name: paddle.to_tensor(value) for name, value in batch.items()}
        batch_scores = model(**inputs, return_dict=False)[0].astype("float32").numpy()
        scores += [row[: len(e.choice_ids)].tolist() for row, e in zip(batch_scores, chunk)]
        if progress:
            progress(len(chunk))
    if was_training:
        model.train()
    return scores


def choice_metrics(scores: List[List[float]], labels: List[int]):
    """`accuracy` (%) and `loss` (mean cross-entropy over the choice scores, what training minimises)."""
    correct = sum(max(range(len(s)), key=s.__getitem__) == label for s, label in zip(scores, labels))
    losses = []
    for s, label in zip(scores, labels):
        top = max(s)
        losses.append(top + math.log(sum(math.exp(v - top) for v in s)) - s[label])
    count = max(len(labels), 1)
    return {"accuracy": round(100.0 * correct / count, 4), "loss": sum(losses) / count}


def prediction_rows(rows: List[dict], scores: List[List[float]]):
    """Each input row plus `prediction` (the best choice's index) and `scores` (every choice's)."""
    for row, s in zip(rows, scores):
        yield dict(row, prediction=max(range(len(s)), key=s.__getitem__), scores=[round(v, 6) for v in s])

"""GLM's blank-infilling inputs, built once for training, evaluation and prediction alike.

    source side  [CLS] source [gMASK] <|endoftext|>            bidirectional (before sep)
    target side  <|startofpiece|> target                         causal, sees the whole source
    labels       target <|endofpiece|>                           one to the right of the target side

position_ids[0] counts 0..S-1 over the source and stays at the mask's position over the target;
position_ids[1] is 0 over the source and 1..T+1 over the target (sop gets 1). The attention mask is
`sep` = S per row. Batches are right-padded after the target: under the sep rule a real query i sees
only keys j < sep or j <= i, so padding (always after every real token) is never attended, and padded
positions carry no loss.
"""

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .bounds import SRC_LENGTH, TGT_LENGTH
from .errors import InvalidSettings
from .tokenization import GLMSpecialIds, encode_text, special_token_ids

__all__ = [
    "MASK_TOKENS", "GLMInputBuilder", "GLMExample", "collate_examples", "IGNORE_INDEX",
    "MultipleChoiceBuilder", "MultipleChoiceExample", "collate_multiple_choice", "PROMPT_PLACEMENTS", "BLANK",
]

MASK_TOKENS = ("[gMASK]", "[MASK]", "[sMASK]")
BLANK = re.compile("|".join(re.escape(token) for token in MASK_TOKENS))  # a blank in text, before tokenization
PROMPT_PLACEMENTS = ("split", "start", "blank")  # where P-tuning's prompt tokens go (MultipleChoiceBuilder)
IGNORE_INDEX = -100  # label of positions outside the loss


@dataclass
class GLMExample:
    input_ids: List[int]
    position_ids: List[List[int]]  # [2, L]
    sep: int
    labels: Optional[List[int]] = None
    loss_mask: Optional[List[int]] = None
    source_truncated: bool = False
    target_truncated: bool = False

    def features(self) -> Dict[str, object]:
        """What the model consumes (`attention_mask` is the sep)."""
        features = {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.sep}
        if self.labels is not None:
            features.update(labels=self.labels, loss_mask=self.loss_mask)
        return features


class GLMInputBuilder:
    """Turns (source, target) text into a GLMExample.

    src_length bounds the source side including [CLS], the mask token and <|endoftext|>; the source text
    is cut on the right to fit. tgt_length bounds the target side (<|startofpiece|> + target, equally
    target + <|endofpiece|>); a cut target keeps no <|endofpiece|> (THUDM). A source that already holds [MASK]/[sMASK]/[gMASK] keeps its blanks;
    otherwise `mask_token` is appended.
    """

    def __init__(self, tokenizer, src_length: int, tgt_length: int, mask_token: str = "[gMASK]"):
        problems = [] if mask_token in MASK_TOKENS else [("mask_token", f"must be one of {', '.join(MASK_TOKENS)}; got {mask_token!r}")]
        for name, value, bound in (("src_length", src_length, SRC_LENGTH), ("tgt_length", tgt_length, TGT_LENGTH)):
            problem = bound.problem(value)
            if problem:
                problems.append((name, problem))
        if problems:
            raise InvalidSettings(problems)
        self.tokenizer = tokenizer
        self.ids: GLMSpecialIds = special_token_ids(tokenizer)
        self.src_length = src_length
        self.tgt_length = tgt_length
        self.mask_token_id = tokenizer.convert_tokens_to_ids(mask_token)

    def tokenize(self, text: str, continuation: bool = False) -> List[int]:
        """As pretraining tokenizes it (glm.tokenization.encode_text): no "▁" after a blank, nor at the
        start of a `continuation` (a choice filling a blank)."""
        return encode_text(self.tokenizer, text, continuation)

    def source_ids(self, source: str):
        """`[CLS] source [mask] <|endoftext|>` cut to src_length, and whether the text was cut."""
        tokens = self.tokenize(source)
        has_blank = any(token in self.ids.mask_ids for token in tokens[: self.src_length - 2])
        budget = self.src_length - (2 if has_blank else 3)  # [CLS], <|endoftext|>, and the mask if appended
        truncated = len(tokens) > budget
        tokens = tokens[:budget] + ([] if has_blank else [self.mask_token_id])
        return [self.ids.cls] + tokens + [self.ids.eos], truncated

    def build(self, source: str, target: Optional[str] = None) -> GLMExample:
        input_ids, source_truncated = self.source_ids(source)
        source_length = len(input_ids)
        mask_position = next(i for i, token in enumerate(input_ids) if token in self.ids.mask_ids)
        positions = list(range(source_length))
        blocks = [0] * source_length
        if target is None:
            return GLMExample(input_ids, [positions, blocks], source_length, source_truncated=source_truncated)

        # THUDM's cut, (target + [eop])[:tgt_length]: a target that does not fit loses its eop, so the
        # model is never taught to stop mid-sentence at the length cap.
        target_labels = self.tokenize(target) + [self.ids.eop]
        target_truncated = len(target_labels) > self.tgt_length
        target_labels = target_labels[: self.tgt_length]
        target_length = len(target_labels)  # sop + target on the input side, shifted one as labels
        return GLMExample(
            input_ids=input_ids + [self.ids.sop] + target_labels[:-1],
            position_ids=[positions + [mask_position] * target_length, blocks + list(range(1, target_length + 1))],
            sep=source_length,
            labels=[IGNORE_INDEX] * source_length + target_labels,
            loss_mask=[0] * source_length + [1] * target_length,
            source_truncated=source_truncated,
            target_truncated=target_truncated,
        )


def collate_examples(features: Sequence[Dict[str, object]], pad_id: int) -> Dict[str, np.ndarray]:
    """Right-pads a batch to its longest row (not to src_length + tgt_length)."""
    length = max(len(f["input_ids"]) for f in features)

    def padded(values, fill):
        return list(values) + [fill] * (length - len(values))

    batch = {
        "input_ids": np.array([padded(f["input_ids"], pad_id) for f in features], dtype="int64"),
        "position_ids": np.array(
            [[padded(channel, 0) for channel in f["position_ids"]] for f in features], dtype="int64"
        ),
        "attention_mask": np.array([f["attention_mask"] for f in features], dtype="int64"),
    }
    if "labels" in features[0]:
        batch["labels"] = np.array([padded(f["labels"], IGNORE_INDEX) for f in features], dtype="int64")
        batch["loss_mask"] = np.array([padded(f["loss_mask"], 0) for f in features], dtype="float32")
    return batch


# ---------------------------------------------------------------------------------------------------------
# Multiple choice / cloze: one packed row per example (THUDM's cloze tasks, HF's
# build_inputs_for_multiple_choice; PaddleNLP's builder calls numpy methods that do not exist).
#
#     [CLS] context-with-[MASK] <|endoftext|>  <|startofpiece|> choice1[:-1]  <|startofpiece|> choice2[:-1] ...
#
# Every block sits at the mask's position (position_ids[0] = mask position, position_ids[1] = 1..n), sees
# the whole context, is causal within itself and never sees another block: the 4-D mask, which the sep
# form cannot say. Choice c is scored where its block predicts its tokens (`choice_indices`).


@dataclass
class MultipleChoiceExample:
    input_ids: List[int]
    position_ids: List[List[int]]  # [2, L]
    context_length: int  # tokens every position sees
    choice_ids: List[List[int]]  # per choice, its tokens
    choice_indices: List[List[int]]  # per choice, the positions predicting them
    label: Optional[int] = None
    context_truncated: bool = False
    prompt_positions: List[int] = field(default_factory=list)  # P-tuning's prompt tokens (glm/ptuning.py)

    def features(self) -> Dict[str, object]:
        features = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "context_length": self.context_length,
            "choice_ids": self.choice_ids,
            "choice_indices": self.choice_indices,
        }
        if self.label is not None:
            features["labels"] = self.label
        if self.prompt_positions:
            features["prompt_positions"] = self.prompt_positions
        return features


class MultipleChoiceBuilder:
    """Turns (context, choices[, label]) into a packed MultipleChoiceExample.

    The context becomes `[CLS] context [MASK] <|endoftext|>` within src_length tokens ([MASK] appended when
    the context holds no blank). A longer context is cut to a window that keeps its first blank (the
    tokens nearest the blank survive). Choices are tokenized without special tokens and never cut.

    With `prompt_tokens` N (THUDM's P-tuning, glm/ptuning.py), N placeholder tokens go into the pattern, at
    `prompt_placement`: `start` (after [CLS], before the context), `blank` (just before the blank), or `split`
    (THUDM's patterns spread them: the first half, rounded up, at the start, the rest before the blank).
    They count in src_length; the model replaces their embeddings, their positions are the pattern's.
    """

    def __init__(self, tokenizer, src_length: int, prompt_tokens: int = 0, prompt_placement: str = "split"):
        # The generation builder's tokenizer glue, special ids and src_length check; its target side is unused here.
        self.glm = GLMInputBuilder(tokenizer, src_length, tgt_length=1, mask_token="[MASK]")
        self.ids = self.glm.ids
        self.src_length = src_length
        if prompt_placement not in PROMPT_PLACEMENTS:
            raise ValueError(f"prompt placement must be one of {', '.join(PROMPT_PLACEMENTS)}; got {prompt_placement}")
        if prompt_tokens and src_length < prompt_tokens + 3:
            raise ValueError(f"src_length {src_length} cannot hold {prompt_tokens} prompt tokens with [CLS], a blank "
                             "and <|endoftext|>")
        self.prompt_tokens, self.prompt_placement = prompt_tokens, prompt_placement

    def context_ids(self, context: str):
        """`[CLS] context <|endoftext|>` holding a blank (and the prompt tokens), within src_length; its blank
        position; whether cut; the prompt tokens' positions."""
        tokens = self.glm.tokenize(context)
        blanks = [i for i, token in enumerate(tokens) if token in self.ids.mask_ids]
        if not blanks:
            tokens.append(self.ids.mask)
            blanks = [len(tokens) - 1]
        budget = self.src_length - 2 - self.prompt_tokens  # [CLS], <|endoftext|> and the prompt
        truncated = len(tokens) > budget
        if truncated:
            start = max(0, min(blanks[0] - budget // 2, len(tokens) - budget))
            tokens = tokens[start : start + budget]
            blanks[0] -= start
        at_start = {"start": self.prompt_tokens, "blank": 0, "split": (self.prompt_tokens + 1) // 2}[self.prompt_placement]
        before_blank = self.prompt_tokens - at_start
        placeholder = self.ids.pad  # any id: the model replaces its embedding
        ids = ([self.ids.cls] + [placeholder] * at_start + tokens[: blanks[0]] + [placeholder] * before_blank
               + tokens[blanks[0] :] + [self.ids.eos])  # fmt: skip
        blank = 1 + at_start + blanks[0] + before_blank
        prompt_positions = list(range(1, 1 + at_start)) + list(range(blank - before_blank, blank))
        return ids, blank, truncated, prompt_positions

    def build(self, context: str, choices: Sequence[str], label: Optional[int] = None) -> MultipleChoiceExample:
        input_ids, mask_position, truncated, prompt_positions = self.context_ids(context)
        context_length = len(input_ids)
        positions, blocks = list(range(context_length)), [0] * context_length
        choice_ids, choice_indices = [], []
        for number, choice in enumerate(choices):
            tokens = self.glm.tokenize(choice, continuation=True)  # it continues the text at the blank
            if not tokens:
                raise ValueError(f"choice {number} ({choice!r}) has no tokens")
            choice_indices.append(list(range(len(input_ids), len(input_ids) + len(tokens))))
            choice_ids.append(tokens)
            input_ids = input_ids + [self.ids.sop] + tokens[:-1]
            positions += [mask_position] * len(tokens)
            blocks += list(range(1, len(tokens) + 1))
        return MultipleChoiceExample(
            input_ids, [positions, blocks], context_length, choice_ids, choice_indices, label, truncated, prompt_positions
        )


def multiple_choice_mask(length: int, context_length: int, choice_indices: Sequence[Sequence[int]]) -> np.ndarray:
    """[length, length] 0/1: everyone sees the context; a block sees itself causally; padding sees the context."""
    mask = np.zeros([length, length], dtype="int64")
    mask[:, :context_length] = 1
    for block in choice_indices:
        start, end = block[0], block[-1] + 1
        mask[start:end, start:end] = np.tril(np.ones([end - start, end - start], dtype="int64"))
    return mask


def collate_multiple_choice(features: Sequence[Dict[str, object]], pad_id: int) -> Dict[str, np.ndarray]:
    """Right-pads a batch of packed rows; choices padded to [B, C, n] with index -1 (GLMForMultipleChoice
    reads an absent choice as score -inf)."""
    length = max(len(f["input_ids"]) for f in features)
    num_choices = max(len(f["choice_ids"]) for f in features)
    longest = max(len(c) for f in features for c in f["choice_ids"])

    def padded(values, size, fill):
        return list(values) + [fill] * (size - len(values))

    def padded_choices(choices, fill):
        rows = [padded(c, longest, fill) for c in choices]
        return rows + [[fill] * longest] * (num_choices - len(rows))

    batch = {
        "input_ids": np.array([padded(f["input_ids"], length, pad_id) for f in features], dtype="int64"),
        "position_ids": np.array(
            [[padded(channel, length, 0) for channel in f["position_ids"]] for f in features], dtype="int64"
        ),
        "attention_mask": np.stack(
            [multiple_choice_mask(length, f["context_length"], f["choice_indices"])[None] for f in features]
        ),
        "choice_ids": np.array([padded_choices(f["choice_ids"], 0) for f in features], dtype="int64"),
        "choice_indices": np.array([padded_choices(f["choice_indices"], -1) for f in features], dtype="int64"),
    }
    if all("labels" in f for f in features):
        batch["labels"] = np.array([f["labels"] for f in features], dtype="int64")
    if "prompt_positions" in features[0]:
        batch["prompt_positions"] = np.array([f["prompt_positions"] for f in features], dtype="int64")
    return batch

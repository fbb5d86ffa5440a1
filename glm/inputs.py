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

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from .tokenization import GLMSpecialIds, special_token_ids

__all__ = ["MASK_TOKENS", "GLMInputBuilder", "GLMExample", "collate_examples", "IGNORE_INDEX"]

MASK_TOKENS = ("[gMASK]", "[MASK]", "[sMASK]")
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
        if mask_token not in MASK_TOKENS:
            raise ValueError(f"mask_token must be one of {', '.join(MASK_TOKENS)}; got {mask_token!r}")
        if src_length < 4:
            raise ValueError(f"src_length must be at least 4 ([CLS], one token, the mask, <|endoftext|>); got {src_length}")
        if tgt_length < 2:
            raise ValueError(f"tgt_length must be at least 2 (<|startofpiece|> and one token); got {tgt_length}")
        self.tokenizer = tokenizer
        self.ids: GLMSpecialIds = special_token_ids(tokenizer)
        self.src_length = src_length
        self.tgt_length = tgt_length
        self.mask_token_id = tokenizer.convert_tokens_to_ids(mask_token)

    def tokenize(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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

"""The generation task's data: source -> target rows (JSON Lines) turned into GLM examples.

A dataset directory holds `train.json` and `dev.json` (or `.jsonl`), one JSON object per line, read by
glm.jsonl (one-line errors, `skip_bad_rows`, BOM, JSON arrays). The source and target fields are found
among (src, tgt), (content, summary), (source, target) unless named.
"""

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from glm.errors import DataError
from glm.inputs import GLMExample, GLMInputBuilder
from glm.jsonl import read_json_lines
from paddlenlp.utils.log import logger

__all__ = ["Dataset", "KNOWN_FIELD_PAIRS", "read_rows", "build_examples"]

KNOWN_FIELD_PAIRS = (("src", "tgt"), ("content", "summary"), ("source", "target"))


@dataclass
class Dataset:
    path: str
    rows: List[dict]
    source_key: str
    target_key: Optional[str]  # None when the rows carry no target (prediction input)
    skipped: int = 0


def _detect_keys(row: dict, where: str, source_key, target_key, need_target: bool) -> Tuple[str, Optional[str]]:
    if source_key or target_key:
        if not source_key or (need_target and not target_key):
            raise DataError(f"{where}: name both fields, with --src_key and --tgt_key")
        return source_key, target_key
    for src, tgt in KNOWN_FIELD_PAIRS:
        if src in row and tgt in row:
            return src, tgt
    for src, _ in KNOWN_FIELD_PAIRS:
        if src in row and not need_target:
            return src, None
    known = ", ".join(f"({s}, {t})" for s, t in KNOWN_FIELD_PAIRS)
    raise DataError(
        f"{where}: no known source/target fields among {sorted(row)}; expected one of {known} "
        "or name them with --src_key and --tgt_key"
    )


def _check_field(row: dict, key: str, where: str):
    if key not in row:
        raise DataError(f"{where}: no {key!r} field")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is empty")


def read_rows(
    path: str,
    source_key: Optional[str] = None,
    target_key: Optional[str] = None,
    need_target: bool = True,
    skip_bad_rows: bool = False,
) -> Dataset:
    """Reads a JSON Lines file of source/target rows; the fields are detected on the first good row."""
    keys = None

    def check_row(row, where):
        nonlocal keys
        if keys is None:
            keys = _detect_keys(row, where, source_key, target_key, need_target)
        _check_field(row, keys[0], where)
        if keys[1] is not None and (need_target or keys[1] in row):
            _check_field(row, keys[1], where)

    rows, skipped = read_json_lines(path, check_row, skip_bad_rows)
    return Dataset(path, rows, keys[0], keys[1], skipped)


def build_examples(dataset: Dataset, builder: GLMInputBuilder, with_target: bool = True) -> List[GLMExample]:
    """GLM examples of every row; how many sources and targets were cut is reported once."""
    examples = [
        builder.build(row[dataset.source_key], row[dataset.target_key] if with_target else None)
        for row in dataset.rows
    ]
    name = os.path.basename(dataset.path)
    cut_sources = sum(e.source_truncated for e in examples)
    cut_targets = sum(e.target_truncated for e in examples)
    if cut_sources:
        logger.warning(f"{name}: {cut_sources} of {len(examples)} sources cut to src_length={builder.src_length} tokens")
    if cut_targets:
        logger.warning(f"{name}: {cut_targets} of {len(examples)} targets cut to tgt_length={builder.tgt_length} tokens")
    unk_id = getattr(builder.tokenizer, "unk_token_id", None)
    tokens = sum(len(e.input_ids) for e in examples)
    unknown = sum(e.input_ids.count(unk_id) for e in examples) if unk_id is not None else 0
    if unknown:
        logger.warning(
            f"{name}: {unknown} of {tokens} tokens ({100 * unknown / tokens:.2f}%) are unknown "
            "(characters the tokenizer does not know, e.g. emoji or rare ones): the model sees only [UNK] there"
        )
    return examples

"""Reading source -> target datasets (JSON Lines) and turning rows into GLM examples.

A dataset directory holds `train.json` and `dev.json` (or `.jsonl`), one JSON object per line. The
source and target fields are found among (src, tgt), (content, summary), (source, target) unless named.
Every problem in a file stops with one line `FILE:LINE: what is wrong` (a DataError), or, with
`skip_bad_rows`, the row is dropped and the count reported. A UTF-8 byte order mark is skipped, and a
file holding one JSON array of objects is read as its items (with a note).
"""

import json
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from paddlenlp.utils.log import logger

from glm.inputs import GLMExample, GLMInputBuilder

__all__ = ["DataError", "Dataset", "KNOWN_FIELD_PAIRS", "find_split_file", "read_json_lines", "read_rows", "build_examples"]

KNOWN_FIELD_PAIRS = (("src", "tgt"), ("content", "summary"), ("source", "target"))
UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """Bad data, said in one line that names the file (and line)."""


@dataclass
class Dataset:
    path: str
    rows: List[dict]
    source_key: str
    target_key: Optional[str]  # None when the rows carry no target (prediction input)
    skipped: int = 0


def find_split_file(directory: str, split: str) -> str:
    """`DIR/split.json` or `DIR/split.jsonl`."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: no such dataset directory")
    for name in (f"{split}.json", f"{split}.jsonl"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
        if os.path.isdir(path):
            raise DataError(f"{path} is a directory, not a JSON Lines file")
    raise DataError(f"{directory}: no {split}.json or {split}.jsonl")


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


def read_json_lines(path: str, check_row: Callable[[dict, str], None], skip_bad_rows: bool = False) -> Tuple[List[dict], int]:
    """The JSON objects of a JSON Lines file and how many bad ones were skipped. Blank lines are ignored;
    `check_row(row, "FILE:LINE")` raises a DataError for a bad row (which `skip_bad_rows` drops and counts)."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise DataError(f"{path}: {error.strerror.lower()}") from None
    if data.startswith(UTF8_BOM):
        logger.info(f"{name}: skipping the UTF-8 byte order mark at its start")
        data = data[len(UTF8_BOM) :]
    rows, skipped = [], 0
    for where, parse in _entries(data, name):
        try:
            row = parse()
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            check_row(row, where)
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        rows.append(row)
    if not rows:
        why = f"{skipped} bad rows skipped" if skipped else "the file is empty" if not data else "the file holds only whitespace"
        raise DataError(f"{name}: no usable rows ({why})")
    if skipped:
        logger.warning(f"{name}: skipped {skipped} bad rows of {skipped + len(rows)}")
    return rows, skipped


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


def _entries(data: bytes, name: str):
    """(where, parse) for each row: JSON Lines, or the items of a file that is one JSON array."""
    if data.lstrip().startswith(b"["):
        try:
            items = json.loads(data.decode("utf-8"))
        except ValueError:
            items = None  # a first line that is an array: reported row by row below
        if isinstance(items, list):
            logger.warning(f"{name}: one JSON array, not JSON Lines: reading its {len(items)} items as rows")
            for number, item in enumerate(items, start=1):
                yield f"{name}: item {number}", lambda item=item: item
            return
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            yield f"{name}:{number}", lambda raw=raw, where=f"{name}:{number}": _parse_line(raw, where)


def _parse_line(raw: bytes, where: str):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        hint = "; expected JSON Lines, one object per line" if text.lstrip().startswith("[") else ""
        raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno}){hint}") from None


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

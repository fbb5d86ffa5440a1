"""Reading JSON Lines files of rows, as every task's data is given: one JSON object per line.

Every problem in a file stops with one line `FILE:LINE: what is wrong` (a DataError), or, with
`skip_bad_rows`, the row is dropped and the count reported. A UTF-8 byte order mark is skipped, and a
file holding one JSON array of objects is read as its items (with a note). A dataset directory holds
`train.json` and `dev.json` (or `.jsonl`).
"""

import json
import os
from typing import Callable, List, Tuple

from paddlenlp.utils.log import logger

from .errors import DataError

__all__ = ["find_split_file", "read_json_lines", "decode_line", "parse_json_line"]

UTF8_BOM = b"\xef\xbb\xbf"


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
            yield f"{name}:{number}", lambda raw=raw, where=f"{name}:{number}": parse_json_line(raw, where)


def decode_line(raw: bytes, where: str) -> str:
    """A line's text; a DataError `WHERE: not UTF-8 (byte 0x.. at column N)` otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})") from None


def parse_json_line(raw: bytes, where: str):
    """One JSON Lines line's value; a DataError naming `where` (FILE:LINE) when it is not UTF-8 or not JSON."""
    text = decode_line(raw, where)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        hint = "; expected JSON Lines, one object per line" if text.lstrip().startswith("[") else ""
        raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno}){hint}") from None

"""A JSON Lines output that a killed run resumes: rows are appended to OUTPUT.partial as they finish,
beside OUTPUT.partial.json, the fingerprint of what the rows were made from. A rerun continues the
partial file only when its fingerprint is the same (else it refuses, or starts afresh when told to);
`publish_rows` renames the partial file onto OUTPUT once every row is in."""

import json
import os
from typing import Optional

from .cli.console import say
from .errors import UserError
from .files import fsync_directory, write_json_atomic

__all__ = ["files_signature", "resumable_rows", "completed_rows", "publish_rows"]


def files_signature(directory: Optional[str]):
    """Cheap identity of a checkpoint or adapter: its weight and config files' names, sizes and mtimes."""
    if not directory or not os.path.isdir(directory):
        return directory
    return sorted(
        (name, stat.st_size, stat.st_mtime_ns)
        for name in os.listdir(directory)
        if name.endswith((".pdparams", ".safetensors", ".json")) and not name.startswith(".")
        for stat in [os.stat(os.path.join(directory, name))]
    )


def resumable_rows(partial: str, fingerprint: dict, overwrite: bool) -> int:
    """Rows of `partial` made from the same inputs; a partial made from other ones is refused or removed."""
    sidecar = partial + ".json"
    if os.path.exists(partial):
        try:
            with open(sidecar, encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            recorded = None
        if recorded != fingerprint:
            differing = [key for key in fingerprint if not recorded or recorded.get(key) != fingerprint[key]]
            if not overwrite:
                raise UserError(
                    f"{partial} was made from other inputs (differing: {', '.join(differing)}): rerun with the same "
                    "ones to resume it, or with --overwrite_output to start afresh"
                )
            say(f"Starting afresh: removing {partial} (made from other inputs; --overwrite_output)")
            os.unlink(partial)
    write_json_atomic(sidecar, fingerprint)
    return completed_rows(partial)


def completed_rows(partial: str) -> int:
    """Whole JSON lines already in a partial output; a torn last line (a killed run) is cut off."""
    if not os.path.exists(partial):
        return 0
    with open(partial, "rb") as f:
        data = f.read()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(partial, "wb") as f:
            f.write(keep)
    return keep.count(b"\n")


def publish_rows(partial: str, output: str):
    """The complete `partial` (its rows written and fsynced) becomes `output`; its fingerprint goes."""
    os.replace(partial, output)
    fsync_directory(os.path.dirname(os.path.abspath(output)))
    os.unlink(partial + ".json")

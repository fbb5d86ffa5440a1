"""Writing outputs so that a kill never leaves a torn one, and the fault injection that tests it.

`atomic_file` writes beside the target and renames onto it only when writing succeeded; files get the
user's umask (mkstemp alone would make them 0600). `crash_point` kills the process at a named point when
GLM_PADDLE_CRASH_AT asks for it (tests/test_faults.py): a deterministic kill, not a timed one.
"""

import contextlib
import json
import os
import sys
import tempfile
from typing import Dict, Iterable, Optional

__all__ = ["atomic_file", "current_umask", "write_json_atomic", "write_jsonl_atomic", "crash_point", "CRASH_AT_VARIABLE"]


@contextlib.contextmanager
def atomic_file(path: str):
    """A temporary file beside `path`, renamed onto it only when writing succeeded."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes 0600; others must read our outputs
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            yield f
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def write_jsonl_atomic(path: str, rows: Iterable[dict]):
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json_atomic(path: str, value):
    with atomic_file(path) as f:
        json.dump(value, f, ensure_ascii=False, indent=2)


# GLM_PADDLE_CRASH_AT=NAME (or NAME#N, the N-th time) makes the process SIGKILL itself when it reaches
# crash_point(NAME).
CRASH_AT_VARIABLE = "GLM_PADDLE_CRASH_AT"
_crash_counts: Dict[str, int] = {}


def crash_point(name: str, torn_file: Optional[str] = None):
    """Kill this process here if the environment asks for it; `torn_file` is first cut to half its size
    (a write interrupted midway)."""
    wanted = os.environ.get(CRASH_AT_VARIABLE)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] < int(nth or 1):
        return
    if torn_file is not None:
        os.truncate(torn_file, os.path.getsize(torn_file) // 2)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), 9)

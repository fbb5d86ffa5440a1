"""Writing outputs so that a kill never leaves a torn one, and the fault injection that tests it.

`atomic_file` writes beside the target and renames onto it only when writing succeeded; files get the
user's umask (mkstemp alone would make them 0600). `staged_directory` does the same for a whole output
directory. `files_sha256` fingerprints big files once per version of them (`file_sha256`: one file,
plainly). `crash_point` stops the process at a named point when GLM_PADDLE_CRASH_AT asks for it
(tests/test_faults.py): a deterministic kill, not a timed one.
"""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
from typing import Dict, Iterable, Optional, Sequence

__all__ = [
    "atomic_file", "current_umask", "write_json_atomic", "write_jsonl_atomic", "staged_directory", "process_alive",
    "file_sha256", "files_sha256", "crash_point", "CRASH_AT_VARIABLE", "CRASH_SIGNAL_VARIABLE",
]  # fmt: skip


@contextlib.contextmanager
def atomic_file(path: str, binary: bool = False):
    """A temporary file beside `path` (text, or bytes when `binary`), renamed onto it only when writing
    succeeded."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes 0600; others must read our outputs
        with os.fdopen(handle, "wb") if binary else os.fdopen(handle, "w", encoding="utf-8") as f:
            yield f
        os.replace(temporary, path)
    except BaseException:  # also a Ctrl-C or SIGTERM, which may come after the rename
        with contextlib.suppress(FileNotFoundError):
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


def write_json_atomic(path: str, value, **dump_options):
    with atomic_file(path) as f:
        json.dump(value, f, **dict(dict(ensure_ascii=False, indent=2), **dump_options))


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged_directory(output_dir: str, report=print):
    """A new directory `OUTPUT.partial-PID` beside `output_dir`, renamed onto it (which must be absent or
    empty) once the block succeeded, removed when it failed: a kill leaves the staged directory, never a
    torn `output_dir`, and the next run removes what killed runs left (those of running processes stay)."""
    base = os.path.abspath(output_dir).rstrip(os.sep)
    parent, prefix = os.path.dirname(base), os.path.basename(base) + ".partial-"
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and not process_alive(int(pid)):
            report(f"removing {os.path.join(parent, name)}, left by a run that was killed (pid {pid})")
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    staged = f"{base}.partial-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    os.makedirs(staged)
    try:
        yield staged
        crash_point("staged:before-rename")
        os.replace(staged, output_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def file_sha256(path: str) -> str:
    """The plain SHA-256 of one file (what `sha256sum` prints), uncached."""
    return _hash_file(hashlib.sha256(), path).hexdigest()


def _hash_file(digest, path: str):
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest


SHA256_CACHE = ".sha256-cache.json"
SHA256_CACHE_MIN_BYTES = 64 << 20  # smaller files hash in well under a second: no cache file for them


def files_sha256(directory: str, names: Sequence[str]) -> str:
    """SHA-256 of the files `names` of `directory` (each name, then its bytes, in sorted order).

    Hashing a 20 GB checkpoint takes ~30 s, so for files of SHA256_CACHE_MIN_BYTES or more the digest is
    cached beside them, in DIRECTORY/.sha256-cache.json, under their names with their sizes and
    modification times: it is reused while none of them changed. Beside the files because the entry
    describes exactly them: it goes where they go (a copy that keeps mtimes keeps a valid entry, one that
    does not is hashed once more), every user of the files (the adapters trained on a base, the resumes
    of runs that started from it, predict, merge) shares it, and nothing global outlives them. A
    directory we cannot write is hashed every time."""
    names = sorted(names)
    stats = [[name, stat.st_size, stat.st_mtime_ns] for name in names for stat in [os.stat(os.path.join(directory, name))]]
    cache = sum(size for _, size, _ in stats) >= SHA256_CACHE_MIN_BYTES
    key = "\n".join(names)
    cache_file = os.path.join(directory, SHA256_CACHE)
    entries = {}
    if cache:
        try:
            with open(cache_file, encoding="utf-8") as f:
                entries = json.load(f)
        except (OSError, ValueError):
            pass
    entries = entries if isinstance(entries, dict) else {}
    cached = entries.get(key)
    if isinstance(cached, dict) and cached.get("files") == stats:
        return cached["sha256"]
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        _hash_file(digest, os.path.join(directory, name))
    sha256 = digest.hexdigest()
    if cache:
        try:
            write_json_atomic(cache_file, dict(entries, **{key: {"files": stats, "sha256": sha256}}))
        except OSError:
            pass  # a read-only directory: no cache
    return sha256


# GLM_PADDLE_CRASH_AT=NAME (or NAME#N, the N-th time) makes the process signal itself when it reaches
# crash_point(NAME): SIGKILL, or the signal GLM_PADDLE_CRASH_SIGNAL names (TERM, INT: what a `kill` or a
# Ctrl-C would deliver there).
CRASH_AT_VARIABLE = "GLM_PADDLE_CRASH_AT"
CRASH_SIGNAL_VARIABLE = "GLM_PADDLE_CRASH_SIGNAL"
_crash_counts: Dict[str, int] = {}


def crash_point(name: str, torn_file: Optional[str] = None):
    """Signal this process here if the environment asks for it; `torn_file` is first cut to half its
    size (a write interrupted midway)."""
    wanted = os.environ.get(CRASH_AT_VARIABLE)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] != int(nth or 1):
        return
    if torn_file is not None:
        os.truncate(torn_file, os.path.getsize(torn_file) // 2)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get(CRASH_SIGNAL_VARIABLE, "KILL")))

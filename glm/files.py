"""Crash-safe outputs, the one place that writes them: whatever kills a run, an output is either whole or
absent (or the previous one), never torn, and two runs never write the same output at once.

  atomic_file         a file written beside its target and renamed onto it once complete
  staged_directory    a directory built as `DIR.partial-PID` and renamed onto DIR once complete (replacing
                      a previous one whole when asked); what killed runs left is removed by the next one
  publish_directory   that rename, for a directory staged elsewhere (a checkpoint under `.staging/`)
  publish_files       files moved into a directory one by one, the weights last (a final model)
  fsync_file / fsync_directory
  file_sha256 / files_sha256   content hashes, the big files' cached beside them
  locks               `output_dir_lock` / `output_file_lock`: one writer at a time, a dead writer's lock
                      taken over
  crash_point         the fault injection that tests all of it (GLM_PADDLE_CRASH_AT)

Files get the user's umask (mkstemp alone would make them 0600).
"""

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Callable, Dict, Iterable, Optional, Sequence

from .errors import UserError

__all__ = [
    "atomic_file", "current_umask", "write_json_atomic", "write_jsonl_atomic", "fsync_file", "fsync_directory",
    "staged_directory", "publish_directory", "remove_leftovers", "leftover_pid", "publish_files", "process_alive", "file_sha256", "files_sha256",
    "acquire_lock", "acquire_file_lock", "release_lock", "check_writable", "output_dir_lock", "output_file_lock",
    "crash_point", "CRASH_AT_VARIABLE", "CRASH_SIGNAL_VARIABLE",
]  # fmt: skip


# -- files -------------------------------------------------------------------------------------------------


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


def fsync_file(f):
    """What was written to the open file `f` is on disk."""
    f.flush()
    os.fsync(f.fileno())


def fsync_directory(path: str):
    """The renames and new names in directory `path` are on disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -- directories -------------------------------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LEFTOVER_KINDS = (".partial-", ".replaced-")  # a directory being built; a replaced one not yet removed


def remove_leftovers(parent: str, name: str = "", report: Callable[[str], None] = print):
    """What killed runs left in `parent` beside `name` (or beside anything): `NAME.partial-PID` and
    `NAME.replaced-PID` of processes that are gone; those of running processes stay."""
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        pid = leftover_pid(entry, name)
        if pid is not None and not process_alive(pid):
            report(f"removing {os.path.join(parent, entry)}, left by a run that was killed (pid {pid})")
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def leftover_pid(entry: str, name: str = ""):
    """The pid in `entry` when it is a `NAME.partial-PID` or `NAME.replaced-PID` (any name when `name` is
    empty), else None."""
    for kind in LEFTOVER_KINDS:
        start = entry.find(kind) if not name else (len(name) if entry.startswith(name + kind) else -1)
        if start > 0 and entry[start + len(kind):].isdigit():
            return int(entry[start + len(kind):])
    return None


def publish_directory(staged: str, target: str, crash_name: str = "staged"):
    """Rename the complete directory `staged` onto `target`. A previous `target` is moved aside first and
    removed once the new one is in place, so a kill leaves the old one or the new one (or the old one
    aside, as TARGET.replaced-PID), never a mixture. `crash_name` names the crash points around it."""
    crash_point(f"{crash_name}:before-rename")
    aside = None
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        aside = f"{target}.replaced-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(target, aside)
    os.replace(staged, target)
    fsync_directory(os.path.dirname(os.path.abspath(target)))
    crash_point(f"{crash_name}:published")
    if aside:
        shutil.rmtree(aside)


@contextlib.contextmanager
def staged_directory(output_dir: str, report: Callable[[str], None] = print, crash_name: str = "staged"):
    """A new directory `OUTPUT.partial-PID` beside `output_dir`, renamed onto it once the block succeeded
    (`publish_directory`, which replaces a previous one whole), removed when it failed: a kill leaves the
    staged directory, never a torn `output_dir`, and the next run removes what killed runs left (those of
    running processes stay)."""
    base = os.path.abspath(output_dir).rstrip(os.sep)
    remove_leftovers(os.path.dirname(base), os.path.basename(base), report)
    staged = f"{base}.partial-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    os.makedirs(staged)
    try:
        yield staged
        publish_directory(staged, base, crash_name)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def publish_files(staged: str, output_dir: str, last: Callable[[str], bool], crash_name: str = "final"):
    """Move the files of the complete directory `staged` into `output_dir`, those `last` names after the
    others, then remove `staged`: a kill in between leaves each file whole, old or new (a final model:
    the previous weights beside the new config, or the new weights)."""
    names = sorted(os.listdir(staged), key=last)
    for number, name in enumerate(names):
        if number == 1:
            crash_point(f"{crash_name}:between-renames")
        os.replace(os.path.join(staged, name), os.path.join(output_dir, name))
    fsync_directory(output_dir)
    os.rmdir(staged)


# -- hashes ------------------------------------------------------------------------------------------------


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


# -- locks -------------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"
_held_locks: Dict[str, str] = {}  # what is locked (an output dir or file) -> its lock file
_created_dirs: Dict[str, str] = {}  # output_dir -> the outermost directory check_writable created for it


def check_writable(output_dir: str, flag: str = "--output_dir"):
    """Fail before any work, not at the final save, when `output_dir` cannot be written."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"{flag} {output_dir} is a file, not a directory")
    outermost = None
    parent = os.path.abspath(output_dir)
    while not os.path.exists(parent):
        outermost, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(output_dir, exist_ok=True)
        if outermost:
            _created_dirs[output_dir] = outermost
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as error:
        raise UserError(f"{flag} {output_dir}: cannot write there ({error.strerror})") from None


def _holder_alive(host: str, pid: int) -> bool:
    # another machine's process cannot be checked: assume it runs
    return host != socket.gethostname() or process_alive(pid)


def acquire_lock(output_dir: str):
    """`output_dir/.lock` holding `host pid`: a second concurrent run refuses; a stale one is taken over."""
    _take_lock(output_dir, os.path.join(output_dir, LOCK_FILE), "--output_dir", "is in use by another run")


def acquire_file_lock(output_file: str, flag: str = "--output_file"):
    """`OUTPUT.lock` beside an output file, as `acquire_lock` for a directory: two runs never write one file."""
    _take_lock(output_file, output_file + ".lock", flag, "is being written by another run")


def _take_lock(target: str, path: str, flag: str, busy: str):
    me = f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    host, pid = f.read().split()
                pid = int(pid)
            except (OSError, ValueError):
                host, pid = socket.gethostname(), -1  # unreadable or half-written: its writer died at once
            if f"{host} {pid}" == me:
                return  # this process already holds it (a second run in one Python process)
            if pid > 0 and _holder_alive(host, pid):
                raise UserError(
                    f"{flag} {target} {busy} (pid {pid} on {host}; lock {path}): wait for it, or use another {flag}"
                ) from None
            print(f"note     taking over the lock {path} of a run that is gone (pid {pid})", file=sys.stderr, flush=True)
            os.unlink(path)
            continue
        except OSError as error:
            raise UserError(f"{flag} {target}: cannot write there ({error.strerror})") from None
        with os.fdopen(descriptor, "w") as f:
            f.write(me)
        _held_locks[target] = path
        return


def release_lock(target: str):
    """Release the lock of an output dir or file taken by this process; an output dir check_writable
    created and that holds nothing but empty directories (a run refused before writing anything) is
    removed."""
    path = _held_locks.pop(target, None)
    if path is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)
    outermost = _created_dirs.pop(target, None)
    if outermost:
        for directory, _, _ in sorted(os.walk(target), key=lambda entry: -len(entry[0])):  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only an empty one
        directory = os.path.dirname(os.path.abspath(target))
        while len(directory) >= len(outermost):
            try:
                os.rmdir(directory)
            except OSError:
                break
            directory = os.path.dirname(directory)


@atexit.register
def _release_all_locks():  # an uncaught exception or sys.exit past the `with`
    for target in list(_held_locks):
        release_lock(target)


@contextlib.contextmanager
def output_dir_lock(output_dir: str, hold: bool = True):
    """`output_dir`, checked writable and locked for this run while the block runs (`hold` False: a process
    that writes nothing there, e.g. a data-parallel worker other than the main one, takes no lock)."""
    if not hold:
        yield
        return
    check_writable(output_dir)
    acquire_lock(output_dir)
    try:
        yield
    finally:
        release_lock(output_dir)


@contextlib.contextmanager
def output_file_lock(output_file: Optional[str], flag: str = "--output_file"):
    """`output_file` locked for this run while the block runs; no lock without a file."""
    if output_file is None:
        yield
        return
    acquire_file_lock(output_file, flag)
    try:
        yield
    finally:
        release_lock(output_file)


# -- fault injection ---------------------------------------------------------------------------------------

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

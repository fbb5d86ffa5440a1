"""What keeps a training --output_dir safe: one run at a time, checkpoints visible only when complete,
and a final model that replaces the previous one without ever being torn.

A checkpoint is written under `.staging/` and renamed to `checkpoint-N` once every file is on disk, so
a kill leaves either the whole checkpoint or none. The final model is written under `.staging/final`
and its files renamed into --output_dir with the weights last. A rerun resumes from the newest
checkpoint that passes `checkpoint_problem` (others, written by PaddleNLP or torn by a full disk, are
removed with a note) and takes over the lock of a run whose process is gone. A directory a run created
and left empty (it was refused before writing anything) is removed with its lock.
"""

import atexit
import contextlib
import json
import os
import re
import shutil
import socket
from typing import List, Optional, Tuple

from paddlenlp.trainer.trainer_utils import PREFIX_CHECKPOINT_DIR
from paddlenlp.utils.log import logger

from ..errors import UserError, at_exit
from ..files import crash_point, process_alive

__all__ = [
    "STAGING", "LOCK_FILE", "checkpoint_problem", "newest_complete_checkpoint", "acquire_lock", "acquire_file_lock",
    "release_lock", "check_writable", "publish_checkpoint", "publish_final_model", "staging_dir", "remove_checkpoints",
    "checkpoint_step", "TRAINER_STATE",
]  # fmt: skip

STAGING = ".staging"
LOCK_FILE = ".lock"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
WEIGHT_SUFFIXES = (".pdparams", ".safetensors", ".index.json")
SCHEDULER_FILE = "scheduler.pdparams"


def staging_dir(output_dir: str, name: str) -> str:
    """An empty `output_dir/.staging/name` (what a killed run left there is removed)."""
    path = os.path.join(output_dir, STAGING, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)  # data-parallel workers that save nothing still create it
    return path


def _is_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) and name != SCHEDULER_FILE


def checkpoint_problem(path: str, with_optimizer: bool = True) -> Optional[str]:
    """Why the checkpoint directory `path` cannot be resumed from, or None when it is complete."""
    if not os.path.isdir(path):
        return "no such directory"
    names = os.listdir(path)
    try:
        with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
            json.load(f)["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no complete {TRAINER_STATE}"
    if not any(_is_weights(name) for name in names):
        return "no weights file"
    if with_optimizer and not any(name.startswith("optimizer") for name in names):
        return "no optimizer state"
    if with_optimizer and SCHEDULER_FILE not in names:
        return f"no {SCHEDULER_FILE}"
    empty = [name for name in names if os.path.getsize(os.path.join(path, name)) == 0]
    if empty:
        return f"{empty[0]} is empty"
    return None


def checkpoint_step(path: str) -> int:
    """The global step a complete checkpoint was saved at."""
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
        return json.load(f)["global_step"]


def _numbered_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    found = [(int(m.group(1)), os.path.join(output_dir, name))
             for name in os.listdir(output_dir) if (m := CHECKPOINT_NAME.match(name))]  # fmt: skip
    return sorted(found, reverse=True)


def newest_complete_checkpoint(output_dir: str, with_optimizer: bool, remove_incomplete: bool,
                               report: bool = True) -> Optional[str]:
    """The highest-numbered complete checkpoint; newer incomplete ones are reported and (by the process
    that saves) removed, since resuming from them fails or silently restarts (PaddleNLP's
    get_last_checkpoint takes the highest number whatever its state)."""
    for _, path in _numbered_checkpoints(output_dir) if os.path.isdir(output_dir) else []:
        problem = checkpoint_problem(path, with_optimizer)
        if problem is None:
            return path
        if report:
            logger.warning(f"Skipping {path}: incomplete ({problem}), a run killed while writing it; removing it")
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def remove_checkpoints(output_dir: str):
    """Every checkpoint-N of `output_dir` (a run starting afresh there: left, a later resume would take
    the old run's newest checkpoint, and rotation would delete the new run's ones first)."""
    for _, path in _numbered_checkpoints(output_dir):
        shutil.rmtree(path)


_created_dirs = {}  # output_dir -> the outermost directory check_writable created for it


def check_writable(output_dir: str):
    """Fail before training, not at the final save, when `output_dir` cannot be written."""
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
        raise UserError(f"--output_dir {output_dir}: cannot write there ({error.strerror})") from None


_held_locks = {}  # what is locked (an output dir or file) -> its lock file


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
            logger.warning(f"Taking over the lock {path} of a run that is gone (pid {pid})")
            os.unlink(path)
            continue
        except OSError as error:
            raise UserError(f"{flag} {target}: cannot write there ({error.strerror})") from None
        with os.fdopen(descriptor, "w") as f:
            f.write(me)
        _held_locks[target] = path
        return


def release_lock(target: str):
    """Release the lock of an output dir or file taken by this process; an output dir it created and
    that stayed empty (a run refused before writing anything) is removed."""
    path = _held_locks.pop(target, None)
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass
    outermost = _created_dirs.pop(target, None)
    if outermost:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(target, STAGING))
        directory = os.path.abspath(target)
        while True:
            try:
                os.rmdir(directory)  # only an empty one
            except OSError:
                break
            if directory == outermost:
                break
            directory = os.path.dirname(directory)


@atexit.register
def _release_all_locks():
    for target in list(_held_locks):
        release_lock(target)


at_exit(_release_all_locks)


def _fsync_directory(path: str):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_checkpoint(staged: str, final: str):
    """Make the complete checkpoint `staged` visible as `final` in one rename."""
    crash_point("checkpoint:before-rename")
    if os.path.exists(final):  # the same step saved again by a rerun
        shutil.rmtree(final)
    os.replace(staged, final)
    _fsync_directory(os.path.dirname(final))
    crash_point("checkpoint:published")


def publish_final_model(staged: str, output_dir: str):
    """Move the files of the final model into `output_dir`, the weights last: a kill in between leaves
    the previous weights (with the same config and tokenizer) or the new ones, never a torn file."""
    names = sorted(os.listdir(staged), key=_is_weights)
    for number, name in enumerate(names):
        if number == 1:
            crash_point("final:between-renames")
        os.replace(os.path.join(staged, name), os.path.join(output_dir, name))
    _fsync_directory(output_dir)
    os.rmdir(staged)
    try:
        os.rmdir(os.path.dirname(staged))  # .staging, once nothing else is staged there
    except OSError:
        pass

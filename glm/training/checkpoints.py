"""The checkpoints of a training --output_dir: visible only when complete, and the final model replacing the
previous one without ever being torn (both written through glm.files).

A checkpoint is written under `.staging/` and renamed to `checkpoint-N` once every file is on disk, so a
kill leaves either the whole checkpoint or none. The final model is written under `.staging/final` and
its files moved into --output_dir with the weights last. `checkpoint_problem` says why a directory cannot
be resumed from (PaddleNLP's get_last_checkpoint takes the highest number whatever its state)."""

import json
import os
import re
import shutil
from typing import List, Optional, Tuple

from paddlenlp.trainer.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..files import publish_directory, publish_files

__all__ = [
    "STAGING", "TRAINER_STATE", "checkpoint_problem", "checkpoint_step", "complete_checkpoints", "staging_dir",
    "publish_checkpoint", "publish_final_model", "remove_checkpoints",
]  # fmt: skip

STAGING = ".staging"
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


def complete_checkpoints(output_dir: str, with_optimizer: bool) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The highest-numbered complete checkpoint of `output_dir` (or None), and the (path, problem) of the
    incomplete ones numbered above it: a run killed while writing them (resuming from them fails or
    silently restarts)."""
    incomplete = []
    for _, path in _numbered_checkpoints(output_dir) if os.path.isdir(output_dir) else []:
        problem = checkpoint_problem(path, with_optimizer)
        if problem is None:
            return path, incomplete
        incomplete.append((path, problem))
    return None, incomplete


def remove_checkpoints(output_dir: str):
    """Every checkpoint-N of `output_dir` (a run starting afresh there: left, a later resume would take
    the old run's newest checkpoint, and rotation would delete the new run's ones first)."""
    for _, path in _numbered_checkpoints(output_dir):
        shutil.rmtree(path)


def publish_checkpoint(staged: str, final: str):
    """Make the complete checkpoint `staged` visible as `final` in one rename (replacing the same step
    saved by an earlier run whole)."""
    publish_directory(staged, final, crash_name="checkpoint")


def publish_final_model(staged: str, output_dir: str):
    """Move the files of the final model into `output_dir`, the weights last: a kill in between leaves
    the previous weights (with the same config and tokenizer) or the new ones, never a torn file."""
    publish_files(staged, output_dir, last=_is_weights, crash_name="final")
    try:
        os.rmdir(os.path.dirname(staged))  # .staging, once nothing else is staged there
    except OSError:
        pass

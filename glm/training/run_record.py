"""What determines a training run's result, recorded with every checkpoint, so that a rerun with other
settings or other data is refused instead of silently continuing the old run's optimizer, schedule and
data position.

`run_record.json` is written into every checkpoint and, once the run is complete, into --output_dir. It
holds the run's settings (`RunSettings`), the steps per epoch and the total steps the run was planned
for, its global step and the sum of its step losses so far (so train_loss over a resumed run is the mean
over all of its steps, not over the resumed part).

What the settings hold (`run_settings`):
  - every field of the argument dataclasses the task passes, except the free ones: the TrainingArguments
    fields of FREE_TRAINING_FLAGS (output, logging, saving, evaluation, and switches that compute the
    same numbers another way) and the fields a dataclass names in its `free_flags` class attribute;
  - for the flags named in `inputs`, a fingerprint of what they point to, compared instead of the path:
    the model (`model_fingerprint`: config, tokenizer and weights), the training data
    (`data_fingerprint`). A moved copy with the same content resumes; other content at the same path
    is refused;
  - the number of data-parallel processes.
max_steps and num_train_epochs count as the total number of steps they give: a rerun may raise it (it
trains on to the new total), not lower it.

Why every field but a list of free ones, rather than each task listing the fields that matter: a field
nobody thought of (a new objective flag, a PaddleNLP option) then refuses a resume, named in the
message, instead of being ignored without a word; the free list only holds fields whose effect is known
not to reach the trained weights, and the worst a missing entry there can do is one refusal too many.

A task (glm.training.task.Task) plugs in by naming its argument dataclasses and the flags compared by
content, and declares its free fields. For pretraining, with its objective dataclass and a
prepared-corpus directory:

    @dataclass
    class PretrainingArguments:
        corpus_dir: str = ...
        mask_ratio: float = ...              # recorded: it determines the result
        max_eval_batches: int = ...          # not:
        free_flags: ClassVar[Tuple[str, ...]] = ("max_eval_batches",)

    class PretrainingTask(Task):
        def recorded_arguments(self):
            return (self.pretraining_args,)
        def inputs(self):
            return {"model_name_or_path": model_fingerprint(self.model_args.model_name_or_path),
                    "corpus_dir": directory_fingerprint(self.pretraining_args.corpus_dir)}

run_task then computes run_settings((model_args, *recorded_arguments, training_args), inputs), refuses a
checkpoint with other settings in one line (resume.decide_resume) and records them with every
checkpoint (GLMTrainer).

Leave out a dataclass whose fields only reach evaluation (finetune_generation.py leaves out its
decoding flags, GenerationArguments).
"""

import json
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence

from paddlenlp.trainer import TrainingArguments
from paddlenlp.utils.log import logger

from ..checkpoint import weights_sha256
from ..configuration import BUILTIN_CHECKPOINTS
from ..errors import DataError
from ..files import files_sha256
from ..jsonl import find_split_file
from ..tokenization import TOKENIZER_FILES

__all__ = [
    "RECORD_FILE", "FREE_TRAINING_FLAGS", "RunSettings", "run_settings", "total_steps", "read_record",
    "model_fingerprint", "data_fingerprint", "directory_fingerprint",
]  # fmt: skip

RECORD_FILE = "run_record.json"

# TrainingArguments fields that do not change the trained weights.
FREE_TRAINING_FLAGS = frozenset({
    # where the run writes, whether it trains or evaluates, where it runs
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "do_train", "do_eval", "do_predict",
    "do_export", "device", "no_cuda", "local_rank",
    # logging
    "logging_dir", "logging_strategy", "logging_first_step", "logging_steps", "log_on_each_node", "report_to",
    "wandb_api_key", "run_name", "disable_tqdm", "skip_memory_metrics", "skip_profile_timer",
    # saving (a checkpoint without optimizer state is not resumed from at all)
    "save_strategy", "save_steps", "save_total_limit", "save_on_each_node", "ignore_save_lr_and_optim",
    # evaluation
    "evaluation_strategy", "eval_steps", "per_device_eval_batch_size", "eval_accumulation_steps",
    "prediction_loss_only", "max_evaluate_steps", "minimum_eval_times", "fp16_full_eval", "bf16_full_eval",
    # the same numbers computed another way (recompute replays dropout's random state; tests/test_finetune.py)
    "recompute", "dataloader_num_workers", "lazy_data_processing",
})  # fmt: skip
EXTENSIBLE = ("max_steps", "num_train_epochs")  # compared as the total number of steps


def _plain(value):
    """`value` as it reads back from JSON (enums become their string values, tuples lists)."""
    return json.loads(json.dumps(value, default=str))


def total_steps(max_steps: int, num_train_epochs: float, steps_per_epoch: int) -> int:
    """The optimizer steps a run takes, as PaddleNLP's Trainer.train counts them."""
    return max_steps if max_steps > 0 else int(steps_per_epoch * num_train_epochs)


@dataclass
class RunSettings:
    flags: Dict[str, Any]  # field name -> value, as JSON
    inputs: Dict[str, Any]  # field name -> fingerprint of what it points to
    processes: int  # data-parallel processes

    def to_json(self) -> dict:
        return {"flags": self.flags, "inputs": self.inputs, "processes": self.processes}

    def total_steps(self, steps_per_epoch: int) -> int:
        return total_steps(self.flags["max_steps"], self.flags["num_train_epochs"], steps_per_epoch)

    def differences(self, record: dict) -> List[str]:
        """How this run's settings differ from those `record` (a run_record.json) holds, one `--flag old →
        new` each; a total number of steps raised is no difference, one lowered is."""
        recorded = record.get("settings") or {}
        old_flags, old_inputs = recorded.get("flags", {}), recorded.get("inputs", {})
        changes = []
        for name in sorted(set(self.flags) | set(old_flags)):
            old, new = old_flags.get(name, "(unset)"), self.flags.get(name, "(unset)")
            if name not in EXTENSIBLE and name not in self.inputs and old != new:
                changes.append(f"--{name} {_shown(old)} → {_shown(new)}")
        for name, fingerprint in self.inputs.items():
            if old_inputs.get(name) != fingerprint:
                old, new = old_flags.get(name), self.flags.get(name)
                changes.append(f"--{name} {old} → {new}" if old != new else f"--{name} {new} (its content changed)")
        old_total, new_total = record.get("total_steps"), self.total_steps(record.get("steps_per_epoch", 1))
        if old_total is not None and new_total < old_total:
            changed = [f"--{name} {_shown(old_flags.get(name))} → {_shown(self.flags[name])}"
                       for name in EXTENSIBLE if old_flags.get(name) != self.flags[name]]  # fmt: skip
            changes.append(f"{', '.join(changed)} ({old_total} → {new_total} steps: a run can be extended, not shortened)")
        if recorded.get("processes", self.processes) != self.processes:
            changes.append(f"data-parallel processes {recorded['processes']} → {self.processes}")
        return changes


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def run_settings(arguments: Sequence, inputs: Optional[Dict[str, Any]] = None) -> RunSettings:
    """The settings of a run from its argument dataclasses (one of them the TrainingArguments): every
    field but the free ones (FREE_TRAINING_FLAGS, each dataclass's `free_flags`); `inputs` ({field:
    fingerprint}) compares those fields by the content they point to rather than by their path."""
    flags, processes = {}, None
    for instance in arguments:
        free = set(getattr(type(instance), "free_flags", ()))
        if isinstance(instance, TrainingArguments):
            free |= FREE_TRAINING_FLAGS
            processes = instance.world_size
        flags.update({f.name: getattr(instance, f.name) for f in fields(instance) if f.name not in free})
    if processes is None:
        raise TypeError("run_settings needs the run's TrainingArguments among its arguments")
    return RunSettings(_plain(flags), _plain(inputs or {}), processes)


def read_record(directory: str) -> Optional[dict]:
    """The run_record.json of a checkpoint or a finished --output_dir, or None when it has none."""
    try:
        with open(os.path.join(directory, RECORD_FILE), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning(f"{os.path.join(directory, RECORD_FILE)} is unreadable ({error}): ignoring it")
        return None


def model_fingerprint(model_name_or_path: str) -> dict:
    """A model's identity: a PaddleNLP name, or the hashes of a directory's weights (cached: a 20 GB base
    is read once) and of its config and tokenizer files."""
    path = model_name_or_path
    if path in BUILTIN_CHECKPOINTS and not os.path.isdir(path):
        return {"name": path}
    if not os.path.isdir(path):
        return {"missing": path}  # loading says what is wrong with it
    names = [name for name in ("config.json",) + TOKENIZER_FILES if os.path.isfile(os.path.join(path, name))]
    return {"weights_sha256": weights_sha256(path), "files_sha256": files_sha256(path, names)}


def data_fingerprint(dataset_name_or_path: str, split: str = "train") -> dict:
    """The hash of a dataset directory's `split` file (what training reads; dev only reaches evaluation).
    Without one it is {split: None}: reading the data says what is missing (an evaluation needs none)."""
    try:
        path = find_split_file(dataset_name_or_path, split)
    except DataError:
        return {split: None}
    return {os.path.basename(path): files_sha256(os.path.dirname(path), [os.path.basename(path)])}


def directory_fingerprint(path: str) -> dict:
    """The hashes of every file directly in `path` (e.g. a prepared pretraining corpus), cached beside them."""
    names = sorted(name for name in os.listdir(path) if not name.startswith(".") and os.path.isfile(os.path.join(path, name)))
    return {"files": names, "sha256": files_sha256(path, names)}

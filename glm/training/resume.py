"""Where a training run starts, decided before anything is loaded: `decide_resume` reads --output_dir and
answers (it changes nothing); `prepare_output_dir` then does what that answer implies to the directory;
the caller holds the directory's lock around both (glm.files.output_dir_lock).

A run resumes from --resume_from_checkpoint, else from the newest complete checkpoint in --output_dir,
or has nothing to train when --output_dir holds the finished run. A checkpoint (or finished run)
recorded with other settings (run_record.run_settings: what determines the result) is refused in one
line naming each changed flag; one that asks for more steps is continued.
"""

import os
import shutil
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from paddlenlp.utils.log import logger

from ..cli.console import shown
from ..cli.process import on_interrupt
from ..errors import UserError
from ..files import leftover_pid, remove_leftovers
from .checkpoints import STAGING, checkpoint_problem, complete_checkpoints, remove_checkpoints
from .run_record import RECORD_FILE, RunSettings, read_record

__all__ = ["Resume", "decide_resume", "prepare_output_dir", "rerun_note"]


@dataclass
class Resume:
    """Where a training run starts: `checkpoint` (None: from the start) and the run's `settings`; with
    `complete`, --output_dir already holds the finished run these settings ask for. `afresh`: the run
    starts over in a directory that holds an earlier one (--overwrite_output_dir); `incomplete`: the
    (path, problem) of checkpoints a killed run left torn, newer than `checkpoint`."""

    checkpoint: Optional[str]
    settings: RunSettings
    complete: bool = False
    afresh: bool = False
    incomplete: List[Tuple[str, str]] = field(default_factory=list)


def decide_resume(training_args, settings: RunSettings) -> Resume:
    """Where the run starts; a UserError when --output_dir or --resume_from_checkpoint holds a run with
    other settings, or files that are no run at all. Reads, never writes."""
    if not training_args.do_train:
        return Resume(training_args.resume_from_checkpoint, settings)
    output_dir = training_args.output_dir
    with_optimizer = not training_args.ignore_save_lr_and_optim
    if training_args.resume_from_checkpoint:
        checkpoint = training_args.resume_from_checkpoint
        problem = checkpoint_problem(checkpoint, with_optimizer)
        if problem:
            raise UserError(f"--resume_from_checkpoint {checkpoint}: {problem}")
        refuse_other_settings(settings, checkpoint, f"--resume_from_checkpoint {checkpoint} was written by a run with "
                              "other settings", "rerun with its settings to resume it, or without --resume_from_checkpoint")
        return Resume(checkpoint, settings)
    if training_args.overwrite_output_dir:
        return Resume(None, settings, afresh=True)
    if not os.path.isdir(output_dir):  # other workers: not made yet
        return Resume(None, settings)
    ways_on = "rerun with its settings to continue it, or start afresh with --overwrite_output_dir or another --output_dir"
    finished = read_record(output_dir)
    if finished is not None:
        refuse_other_settings(settings, output_dir, f"--output_dir {output_dir} holds a finished run with other settings",
                              ways_on)
        if settings.total_steps(finished.get("steps_per_epoch", 1)) == finished.get("total_steps"):
            return Resume(None, settings, complete=True)
    checkpoint, incomplete = complete_checkpoints(output_dir, with_optimizer)
    if checkpoint is not None:
        refuse_other_settings(settings, checkpoint, f"--output_dir {output_dir} holds {os.path.basename(checkpoint)} "
                              "of a run with other settings", ways_on)
    elif finished is not None:
        raise UserError(
            f"--output_dir {output_dir} holds a finished run of {finished.get('total_steps')} steps and no checkpoint "
            "to continue it from (it saved none: its --save_steps exceed its steps); rerun with its settings to "
            "leave it as it is, or start afresh with --overwrite_output_dir or another --output_dir"
        )
    elif _other_files(output_dir, incomplete):
        raise UserError(f"{output_dir} is not empty and holds no checkpoint: use --overwrite_output_dir or another --output_dir")
    return Resume(checkpoint, settings, incomplete=incomplete)


def _other_files(output_dir: str, incomplete: List[Tuple[str, str]]) -> List[str]:
    """What --output_dir holds besides hidden files, torn checkpoints and what killed runs left."""
    torn = {os.path.basename(path) for path, _ in incomplete}
    return [name for name in os.listdir(output_dir)
            if not name.startswith(".") and name not in torn and leftover_pid(name) is None]  # fmt: skip


def refuse_other_settings(settings: RunSettings, directory: str, what: str, ways_on: str):
    """A UserError naming every setting of `directory`'s run record that this run changes."""
    record = read_record(directory)
    if record is None:
        logger.warning(f"{directory} records no settings (written before they were recorded): continuing it unchecked")
        return
    changes = settings.differences(record)
    if changes:
        raise UserError(f"{what}: {', '.join(changes)}; {ways_on}")


def prepare_output_dir(training_args, resume: Resume):
    """What `resume` implies for --output_dir, done by the process that saves: what a killed run was
    writing is removed (the staging folder, torn checkpoints, leftovers of replaced ones), an earlier run's
    checkpoints and record when starting afresh; an interruption from here on says how a rerun goes on."""
    if not (training_args.do_train and training_args.should_save):
        return
    output_dir = training_args.output_dir
    shutil.rmtree(os.path.join(output_dir, STAGING), ignore_errors=True)
    remove_leftovers(output_dir, report=logger.warning)
    for path, problem in resume.incomplete:
        logger.warning(f"Skipping {path}: incomplete ({problem}), a run killed while writing it; removing it")
        shutil.rmtree(path, ignore_errors=True)
    if resume.afresh:  # the old run's checkpoints would be resumed or rotated in
        remove_checkpoints(output_dir)
        if os.path.exists(os.path.join(output_dir, RECORD_FILE)):
            os.unlink(os.path.join(output_dir, RECORD_FILE))
    if resume.checkpoint and not training_args.resume_from_checkpoint:
        logger.info(f"Resuming from {resume.checkpoint}, the newest complete checkpoint (--overwrite_output_dir to start afresh)")
    with_optimizer = not training_args.ignore_save_lr_and_optim
    on_interrupt(lambda: rerun_note(output_dir, with_optimizer))


def rerun_note(output_dir: str, with_optimizer: bool) -> str:
    """What rerunning the same command does, for the line printed when a run is interrupted."""
    checkpoint, _ = complete_checkpoints(output_dir, with_optimizer)
    if checkpoint is None:
        return "rerunning the same command starts it again (no checkpoint was written yet)"
    return f"rerunning the same command continues from {shown(checkpoint)}"

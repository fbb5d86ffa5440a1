"""Nothing silently different on a rerun (in-process runs of the micro model): a rerun never trains past
max_steps, a finished run is left as it is, a resume with other settings or data is refused naming each
changed flag, and train_loss covers the whole run. Real kills of real processes: tests/test_faults.py."""

import json
import os
import shutil

import numpy as np
import pytest
from paddlenlp.trainer import TrainerCallback
from test_finetune import micro_data, micro_model, run  # noqa: F401  (fixtures)

import glm.files
from glm.files import CRASH_AT_VARIABLE, CRASH_SIGNAL_VARIABLE
from glm.training.run_record import FREE_TRAINING_FLAGS

# 48 rows in batches of 8: 6 steps an epoch, so step 10 is inside the second epoch (where PaddleNLP's
# resume from the last checkpoint trained a step more).
FLAGS = ("--do_train", "--max_steps", "10", "--save_steps", "5")


class StopAtSave(TrainerCallback):
    """A run interrupted (Ctrl-C) right after its checkpoint at `step` was written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def weights(directory):
    import paddle

    return paddle.load(os.path.join(directory, "model_state.pdparams"), return_numpy=True)


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def results(directory, split="train"):
    return json.loads((directory / f"{split}_results.json").read_text())


def global_step(directory):
    return json.loads((directory / "trainer_state.json").read_text())["global_step"]


def stopped(capsys, *run_args, code=130, callbacks=()):
    with pytest.raises(SystemExit) as exit_info:
        run(*run_args, callbacks=callbacks)
    assert exit_info.value.code == code
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def whole(micro_model, micro_data, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("whole")
    run(micro_model, micro_data, output, *FLAGS, "--do_eval")
    return output


def test_a_rerun_after_the_last_checkpoint_ends_at_max_steps_with_the_whole_runs_loss(
    micro_model, micro_data, tmp_path, whole, capsys  # noqa: F811
):
    line = stopped(capsys, micro_model, micro_data, tmp_path, *FLAGS, callbacks=[StopAtSave(10)])
    assert line == f"stopped by Ctrl-C (SIGINT): rerunning the same command continues from {tmp_path / 'checkpoint-10'}"
    assert not (tmp_path / ".lock").exists()
    trainer = run(micro_model, micro_data, tmp_path, *FLAGS)
    assert "finishing from" in capsys.readouterr().err
    assert trainer.state.global_step == global_step(tmp_path) == 10  # PaddleNLP trained step 11
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert_same_weights(tmp_path, whole)
    assert results(tmp_path)["train_loss"] == pytest.approx(results(whole)["train_loss"], rel=1e-6)


def test_a_resumed_run_ends_as_the_whole_run_with_the_whole_runs_loss(micro_model, micro_data, tmp_path, whole, capsys):  # noqa: F811
    # Cut inside the second epoch; saving flags are free, so the rerun may save at other steps.
    stopped(capsys, micro_model, micro_data, tmp_path, *FLAGS, "--save_steps", "4", callbacks=[StopAtSave(8)])
    trainer = run(micro_model, micro_data, tmp_path, *FLAGS)  # picks up checkpoint-8 by itself
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry][-2:] == [9, 10]
    assert_same_weights(tmp_path, whole)
    # The resumed part alone was 2 of 10 steps: PaddleNLP reported their loss sum over all 10.
    assert results(tmp_path)["train_loss"] == pytest.approx(results(whole)["train_loss"], rel=1e-5)


def test_a_resumed_run_takes_the_untrained_scores_its_first_start_wrote(micro_model, micro_data, tmp_path, capsys):  # noqa: F811
    """Scoring the untrained model again would decode the whole dev set again for the same figures."""
    flags = (*FLAGS, "--eval_before_training", "true")
    stopped(capsys, micro_model, micro_data, tmp_path, *flags, callbacks=[StopAtSave(5)])
    untrained = json.loads((tmp_path / "untrained_results.json").read_text())
    marked = dict(untrained, untrained_rougeL=12.34)  # a figure only the file holds
    (tmp_path / "untrained_results.json").write_text(json.dumps(marked))
    run(micro_model, micro_data, tmp_path, *flags, "--do_eval")
    err = capsys.readouterr().err
    assert "untrained scores from" in err and "12.34" in err, err[-3000:]
    assert json.loads((tmp_path / "untrained_results.json").read_text()) == marked


def test_a_resumed_run_shows_its_own_bar_only(micro_model, micro_data, tmp_path, capsys):  # noqa: F811
    stopped(capsys, micro_model, micro_data, tmp_path, *FLAGS, callbacks=[StopAtSave(5)])
    run(micro_model, micro_data, tmp_path, *FLAGS, "--disable_tqdm", "false")
    err = capsys.readouterr().err
    assert "training:  50%" in err and "5/10" in err, err[-2000:]  # from the resumed step
    assert "Skipping the first batches" not in err and "it/s]" not in err  # PaddleNLP's bar, unlabelled first


def test_an_evaluation_alone_does_not_call_its_model_trained(micro_model, micro_data, tmp_path, capsys):  # noqa: F811
    run(micro_model, micro_data, tmp_path, "--do_train", "false", "--do_eval", "true")
    table = [line.split()[0] for line in capsys.readouterr().err.splitlines() if line.startswith(("trained", "evaluated"))]
    assert table == ["evaluated"]


def test_refusals_name_the_real_reason_over_a_finished_run(micro_model, micro_data, tmp_path, capsys):  # noqa: F811
    run(micro_model, micro_data, tmp_path, "--do_train", "--max_steps", "3")  # --save_steps 1000: no checkpoint
    capsys.readouterr()
    # --lora on a weightless base is refused for that, not for differing from the finished run.
    line = stopped(capsys, micro_model, micro_data, tmp_path, "--do_train", "--max_steps", "3", "--lora", "true", code=2)
    assert "holds no weights" in line, line
    # More steps, with no checkpoint to continue from: said as such (it is not "no checkpoint and not empty").
    line = stopped(capsys, micro_model, micro_data, tmp_path, "--do_train", "--max_steps", "5", code=2)
    assert "holds a finished run of 3 steps and no checkpoint to continue it from" in line, line


def test_a_finished_run_is_left_as_it_is_or_only_evaluated_on_an_explicit_do_eval(
    micro_model, micro_data, tmp_path, capsys  # noqa: F811
):
    run(micro_model, micro_data, tmp_path, *FLAGS)
    files = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    trainer = run(micro_model, micro_data, tmp_path, *FLAGS, "--save_steps", "3", "--logging_steps", "2")  # free flags
    assert "the run is complete (10 steps); its outputs are left as they are" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == files
    assert trainer.state.global_step == 10
    run(micro_model, micro_data, tmp_path, *FLAGS, "--do_eval")
    assert "evaluating its model again (--do_eval)" in capsys.readouterr().err
    assert set(results(tmp_path, "eval")) >= {"eval_rouge1", "eval_loss"}
    assert (tmp_path / "model_state.pdparams").stat().st_mtime_ns == files["model_state.pdparams"]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--learning_rate", "0.01"], "--learning_rate 0.003 → 0.01"),
        (["--per_device_train_batch_size", "4", "--seed", "8"], "--per_device_train_batch_size 8 → 4, --seed 7 → 8"),
        (["--src_length", "32", "--lora_target_modules", ".*mlp.*"], "--src_length 40 → 32"),
        (["--max_steps", "8"], "--max_steps 10 → 8 (10 → 8 steps: a run can be extended, not shortened)"),
        (["--label_smoothing", "0"], "--label_smoothing 0.1 → 0.0"),
    ],
)
def test_a_resume_with_other_settings_is_refused_naming_each_flag(
    micro_model, micro_data, tmp_path, capsys, flags, named  # noqa: F811
):
    stopped(capsys, micro_model, micro_data, tmp_path, *FLAGS, callbacks=[StopAtSave(5)])
    line = stopped(capsys, micro_model, micro_data, tmp_path, *FLAGS, *flags, code=2)
    assert line.startswith(f"error: --output_dir {tmp_path} holds checkpoint-5 of a run with other settings: ")
    assert named in line and line.endswith("start afresh with --overwrite_output_dir or another --output_dir")
    assert not (tmp_path / ".lock").exists()
    run(micro_model, micro_data, tmp_path, *FLAGS, *flags, "--overwrite_output_dir")  # the way on
    assert global_step(tmp_path) == int(dict(zip(flags[::2], flags[1::2])).get("--max_steps", 10))


def test_a_start_afresh_refused_at_loading_leaves_the_earlier_run_as_it_was(micro_model, micro_data, tmp_path, capsys):  # noqa: F811
    """--overwrite_output_dir clears the earlier run only once nothing of the new one can be refused (it used to
    clear it before loading the model: a length the model refuses then cost the earlier run)."""
    stopped(capsys, micro_model, micro_data, tmp_path, *FLAGS, callbacks=[StopAtSave(5)])
    before = sorted(p.name for p in tmp_path.iterdir())
    line = stopped(capsys, micro_model, micro_data, tmp_path, *FLAGS, "--src_length", "1000", "--overwrite_output_dir",
                   code=2)
    assert "--src_length 1000 exceeds the model's max_sequence_length" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before and "checkpoint-5" in before
    run(micro_model, micro_data, tmp_path, *FLAGS)  # the earlier run continues
    assert global_step(tmp_path) == 10


def test_abbreviated_or_mistyped_flags_are_refused_naming_the_flag_meant(micro_model, micro_data, tmp_path, capsys):  # noqa: F811
    """argparse took --max_step for --max_steps without a word; a typo got PaddleNLP's 'not used' list."""
    for typed, meant in (("--max_step", "--max_steps"), ("--learnig_rate", "--learning_rate")):
        line = stopped(capsys, micro_model, micro_data, tmp_path, typed, "30", code=2)
        assert line.startswith(f"error: unknown flag {typed} (did you mean {meant}?)"), line
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_other_data_is_refused_a_moved_copy_resumes_and_more_steps_continue(
    micro_model, micro_data, tmp_path, capsys  # noqa: F811
):
    output = tmp_path / "out"
    stopped(capsys, micro_model, micro_data, output, *FLAGS, callbacks=[StopAtSave(5)])
    other = tmp_path / "other"
    shutil.copytree(micro_data, other)
    lines = (other / "train.json").read_text(encoding="utf-8").splitlines(keepends=True)
    (other / "train.json").write_text("".join(lines[1:] + lines[:1]), encoding="utf-8")  # the same rows, reordered
    line = stopped(capsys, micro_model, str(other), output, *FLAGS, code=2)
    assert f"--dataset_name_or_path {micro_data} → {other}" in line
    shutil.copy(os.path.join(micro_data, "train.json"), other / "train.json")  # a copy with the same content
    trainer = run(micro_model, str(other), output, *FLAGS, "--max_steps", "12", "--logging_steps", "3")
    assert trainer.state.global_step == 12 and global_step(output) == 12


def test_free_training_flags_are_training_arguments():
    from dataclasses import fields

    from paddlenlp.trainer import TrainingArguments

    assert FREE_TRAINING_FLAGS <= {f.name for f in fields(TrainingArguments)}  # no typo, none renamed


# Every point between a run's last checkpoint and its exit, in order, each hit by a SIGINT or SIGTERM in
# turn: each rerun picks up what the interrupted one left and is interrupted at the next point.
POINTS = [
    ("checkpoint:published#2", "TERM"),  # the moment checkpoint-10 appears
    ("train:done", "INT"),
    ("final:before-rename", "TERM"),
    ("final:between-renames", "INT"),
    ("final:published", "TERM"),
    ("train:results-written", "INT"),
    ("eval:results-written", "TERM"),
    ("run:recorded", "INT"),
]


def test_interrupted_at_every_point_after_the_last_checkpoint_reruns_end_as_the_whole_run(
    micro_model, micro_data, tmp_path, whole, capsys, monkeypatch  # noqa: F811
):
    for point, signal_name in POINTS:
        monkeypatch.setenv(CRASH_AT_VARIABLE, point)
        monkeypatch.setenv(CRASH_SIGNAL_VARIABLE, signal_name)
        glm.files._crash_counts.clear()
        line = stopped(capsys, micro_model, micro_data, tmp_path, *FLAGS, "--do_eval",
                       code=130 if signal_name == "INT" else 143)  # fmt: skip
        assert line.startswith("stopped by ") and "rerunning the same command continues from" in line, (point, line)
        assert not (tmp_path / ".lock").exists()
    monkeypatch.delenv(CRASH_AT_VARIABLE)
    run(micro_model, micro_data, tmp_path, *FLAGS, "--do_eval")
    assert "the run is complete" in capsys.readouterr().err  # run:recorded came after the record was written
    assert_same_weights(tmp_path, whole)
    assert global_step(tmp_path) == 10
    assert results(tmp_path)["train_loss"] == pytest.approx(results(whole)["train_loss"], rel=1e-6)
    for metric in ("eval_rouge1", "eval_bleu4", "eval_loss"):
        assert results(tmp_path, "eval")[metric] == pytest.approx(results(whole, "eval")[metric], rel=1e-6)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert not (tmp_path / ".staging").exists()

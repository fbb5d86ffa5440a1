"""Real runs killed (SIGKILL, or SIGTERM / SIGINT as `kill` or Ctrl-C would deliver them, at named points
in the save path: glm.files.crash_point) and run again with the same command: each rerun ends where an
uninterrupted run ends, with its weights, global_step and train_loss."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import paddle
import pytest
from conftest import ROOT
from test_finetune import micro_data, micro_model  # noqa: F401  (fixtures)

from glm.files import CRASH_AT_VARIABLE, CRASH_SIGNAL_VARIABLE

TRAIN_FLAGS = (
    "--src_length", "40", "--tgt_length", "16", "--min_tgt_length", "0", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
    "--warmup_steps", "0", "--logging_steps", "1", "--seed", "7", "--disable_tqdm", "true", "--report_to", "none",
    "--device", "cpu", "--do_train", "--max_steps", "8", "--save_steps", "2",
)  # fmt: skip  (48 rows in batches of 8: step 8, the last checkpoint's, is inside the second epoch)


def run_script(script, *flags, crash_at=None, signal_name="KILL"):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(CRASH_AT_VARIABLE, None)
    if crash_at:
        env.update({CRASH_AT_VARIABLE: crash_at, CRASH_SIGNAL_VARIABLE: signal_name})
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def finetune(model, data, output_dir, crash_at=None, signal_name="KILL"):
    return run_script(
        "finetune_generation.py", "--model_name_or_path", model, "--dataset_name_or_path", data,
        "--output_dir", str(output_dir), *TRAIN_FLAGS, crash_at=crash_at, signal_name=signal_name,
    )  # fmt: skip


def weights(directory):
    return paddle.load(os.path.join(directory, "model_state.pdparams"), return_numpy=True)


@pytest.fixture(scope="module")
def uninterrupted(micro_model, micro_data, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("uninterrupted")
    result = finetune(micro_model, micro_data, output)
    assert result.returncode == 0, result.stderr[-3000:]
    return str(output)


# (crash point, nth time reached): checkpoints are saved at steps 2, 4, 6 and 8, then the final model.
# The points after the last checkpoint: test_the_points_after_the_last_checkpoint.
KILL_POINTS = [
    ("torn:model_state.pdparams#2", "inside the weights write of checkpoint-4"),
    ("saved:model_state.pdparams#2", "between the files of checkpoint-4 (weights written, no optimizer)"),
    ("saved:optimizer.pdopt#2", "before trainer_state.json of checkpoint-4"),
    ("checkpoint:before-rename#3", "checkpoint-6 complete but not yet visible"),
]


@pytest.mark.parametrize("crash_at, where", KILL_POINTS, ids=[point for point, _ in KILL_POINTS])
def test_a_killed_finetune_is_finished_by_rerunning_it(micro_model, micro_data, tmp_path, uninterrupted, crash_at, where):  # noqa: F811
    killed = finetune(micro_model, micro_data, tmp_path, crash_at=crash_at)
    assert killed.returncode == -signal.SIGKILL, f"{where}: {killed.stderr[-2000:]}"
    if crash_at.startswith("saved:optimizer"):
        # And a torn checkpoint as PaddleNLP itself leaves one (written in place, no trainer_state.json).
        os.makedirs(tmp_path / "checkpoint-5")
        (tmp_path / "checkpoint-5" / "model_state.pdparams").write_bytes(b"torn")
    rerun = finetune(micro_model, micro_data, tmp_path)
    assert rerun.returncode == 0, f"{where}: {rerun.stderr[-3000:]}"
    assert "taking over the lock" in rerun.stderr  # the killed run's lock, its process gone
    if crash_at.startswith("saved:optimizer"):
        assert "Skipping" in rerun.stderr and "checkpoint-5: incomplete" in rerun.stderr
        assert not (tmp_path / "checkpoint-5").exists()
        # The header's train line says which checkpoint the run resumes (console.print_header).
        assert re.search(r"resuming \S*checkpoint-2\n", rerun.stderr), rerun.stderr[-2000:]
    final, expected = weights(tmp_path), weights(uninterrupted)
    assert final.keys() == expected.keys()
    for name in final:
        np.testing.assert_array_equal(final[name], expected[name], err_msg=f"{where}: {name}")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [f"checkpoint-{n}" for n in (2, 4, 6, 8)]
    assert not (tmp_path / ".lock").exists()


def train_results(directory):
    with open(os.path.join(directory, "train_results.json"), encoding="utf-8") as f:
        return json.load(f)


# Between the last checkpoint and the exit, in order; each rerun goes on from what the previous one left
# and is stopped at the next point. (Every point, with --do_eval, in-process: test_reruns.py.)
AFTER_THE_LAST_CHECKPOINT = [
    ("checkpoint:published#4", "TERM", 143),  # `kill` the moment checkpoint-8 appears
    ("torn:model_state.pdparams#1", "KILL", -signal.SIGKILL),  # inside the final save's weights write
    ("final:between-renames", "KILL", -signal.SIGKILL),
    ("train:results-written", "INT", 130),  # Ctrl-C
    ("run:recorded", "KILL", -signal.SIGKILL),
]


def test_the_points_after_the_last_checkpoint(micro_model, micro_data, tmp_path, uninterrupted):  # noqa: F811
    for crash_at, signal_name, status in AFTER_THE_LAST_CHECKPOINT:
        stopped = finetune(micro_model, micro_data, tmp_path, crash_at=crash_at, signal_name=signal_name)
        assert stopped.returncode == status, f"{crash_at}: {stopped.stderr[-2000:]}"
        assert "Traceback" not in stopped.stderr and "checkpoint-9" not in os.listdir(tmp_path)
        if signal_name != "KILL":  # one line, the last, and the lock released
            assert stopped.stderr.strip().splitlines()[-1] == (
                f"stopped by {'SIGTERM' if signal_name == 'TERM' else 'Ctrl-C (SIGINT)'}: "
                f"rerunning the same command continues from {tmp_path / 'checkpoint-8'}"
            )
            assert not (tmp_path / ".lock").exists()
    def outputs():
        return {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != ".lock"}  # the killed run's

    before = outputs()
    rerun = finetune(micro_model, micro_data, tmp_path)  # the last stop came after the run was recorded
    assert rerun.returncode == 0 and "Traceback" not in rerun.stderr, rerun.stderr[-3000:]
    assert "the run is complete (8 steps); its outputs are left as they are" in rerun.stderr
    assert outputs() == before and not (tmp_path / ".lock").exists()
    final, expected = weights(tmp_path), weights(uninterrupted)
    for name in expected:
        np.testing.assert_array_equal(final[name], expected[name], err_msg=name)
    with open(tmp_path / "trainer_state.json", encoding="utf-8") as f:
        assert json.load(f)["global_step"] == 8
    assert train_results(tmp_path)["train_loss"] == pytest.approx(train_results(uninterrupted)["train_loss"], rel=1e-6)


def test_a_killed_predict_resumes_with_no_row_lost_or_repeated(micro_data, tmp_path, uninterrupted):  # noqa: F811
    model = uninterrupted
    lines = open(os.path.join(micro_data, "train.json"), encoding="utf-8").readlines()[:20]
    (tmp_path / "in.json").write_text("".join(lines), encoding="utf-8")
    flags = ("--model_name_or_path", str(model), "--data_file", str(tmp_path / "in.json"), "--batch_size", "1",
             "--num_beams", "1", "--decode_strategy", "greedy_search", "--tgt_length", "6", "--min_tgt_length", "0")  # fmt: skip
    whole = run_script("predict_generation.py", *flags, "--output_file", str(tmp_path / "whole.jsonl"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    output = tmp_path / "out.jsonl"
    killed = run_script("predict_generation.py", *flags, "--output_file", str(output), crash_at="predict:chunk-written")
    assert killed.returncode == -signal.SIGKILL
    assert len(open(str(output) + ".partial", encoding="utf-8").readlines()) == 8  # one chunk of 8 rows
    rerun = run_script("predict_generation.py", *flags, "--output_file", str(output))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "Resuming: 8 of 20 rows" in rerun.stderr
    rows = [json.loads(line) for line in open(output, encoding="utf-8")]
    assert rows == [json.loads(line) for line in open(tmp_path / "whole.jsonl", encoding="utf-8")]
    assert not os.path.exists(str(output) + ".partial") and not os.path.exists(str(output) + ".partial.json")


def test_checkpoints_record_the_real_output_dir_and_no_staging_is_left(uninterrupted):
    args = paddle.load(os.path.join(uninterrupted, "checkpoint-8", "training_args.bin"))
    assert args.output_dir == uninterrupted
    assert not os.path.exists(os.path.join(uninterrupted, ".staging"))

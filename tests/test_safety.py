"""Nothing lost, nothing silent: the NaN guard, the output-dir lock, strict loading, file modes, and
every bad input that used to end in a traceback (one `error:` line and exit 2 now)."""

import gc
import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import paddle
import pytest
from conftest import tiny_config_kwargs
from test_finetune import micro_data, micro_model, micro_weights_model, run  # noqa: F401  (fixtures)

import glm
import glm.files
from glm.lora import base_fingerprint
from glm.files import acquire_lock, release_lock
from glm.training.checkpoints import checkpoint_problem
from glm.training.curve import CURVE_FILE, plot_training_curve
from glm.checkpoint import load_model
from glm.convert import read_safetensors, read_torch_bin
from glm.errors import CheckpointError, ConversionError, UserError
from glm.files import write_json_atomic, write_jsonl_atomic
from utils import generation_metrics


def exits_with_one_line(capsys, call, message):
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_a_non_finite_loss_stops_training_naming_the_step(micro_model, micro_data, tmp_path, capsys):  # noqa: F811
    flags = ("--do_train", "--max_steps", "6", "--save_steps", "1", "--learning_rate", "1e30", "--disable_tqdm", "false")
    with pytest.raises(SystemExit) as exit_info:
        run(micro_model, micro_data, tmp_path, *flags)
    assert exit_info.value.code == 2
    del exit_info  # what keeps the trainer and its progress bar alive; an exiting process drops them too
    gc.collect()
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]  # the last line, after the progress bar (closed first)
    assert line.startswith("error: the loss became nan at step 2") and not any("Traceback" in e for e in err)
    assert "the last finite loss was" in line and "at step 1" in line and "lower --learning_rate" in line
    assert any(e.startswith("training:") for e in err)
    assert not (tmp_path / "model_state.pdparams").exists()  # no NaN model as the final output
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]  # the earlier checkpoint stays
    assert checkpoint_problem(str(tmp_path / "checkpoint-1")) is None


def test_generation_metrics_of_empty_predictions_are_zero():
    metrics = generation_metrics(["", " "], ["连衣裙很好看", "裤子"])
    assert metrics == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "bleu4": 0.0}


def test_a_second_run_on_a_locked_output_dir_refuses_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(f"{socket.gethostname()} {sleeper.pid}")
        with pytest.raises(UserError, match=rf"in use by another run \(pid {sleeper.pid}"):
            acquire_lock(str(tmp_path))
    finally:
        sleeper.kill()
        sleeper.wait()
    acquire_lock(str(tmp_path))  # its process is gone now
    assert (tmp_path / ".lock").read_text() == f"{socket.gethostname()} {os.getpid()}"
    release_lock(str(tmp_path))
    assert not (tmp_path / ".lock").exists()


def test_incomplete_checkpoints_are_recognised(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "model_state.pdparams").write_bytes(b"weights")
    assert checkpoint_problem(str(checkpoint)) == "no complete trainer_state.json"
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4')  # torn
    assert checkpoint_problem(str(checkpoint)) == "no complete trainer_state.json"
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4}')
    assert checkpoint_problem(str(checkpoint)) == "no optimizer state"
    assert checkpoint_problem(str(checkpoint), with_optimizer=False) is None


@pytest.fixture
def saved_tiny(tmp_path):
    path = tmp_path / "tiny"
    paddle.seed(3)
    glm.GLMForConditionalGeneration(glm.GLMConfig(**tiny_config_kwargs())).save_pretrained(str(path))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_layers=3), "12 parameters missing from the weights (glm.transformer.layers.2."),
        (dict(num_layers=1), "12 unexpected in the weights (glm.transformer.layers.1."),
        (dict(hidden_size=64), "glm.word_embeddings.weight receives a shape [96, 32], but the expected shape is [96, 64]"),
    ],
)
def test_a_config_that_does_not_fit_the_weights_is_an_error(saved_tiny, change, message):
    config = json.loads((saved_tiny / "config.json").read_text())
    (saved_tiny / "config.json").write_text(json.dumps(dict(config, **change)))
    with pytest.raises(CheckpointError, match="config.json and the weights do not fit") as error:
        load_model(str(saved_tiny))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_truncated_weights_are_one_line(saved_tiny):
    os.truncate(saved_tiny / "model_state.pdparams", 180)
    with pytest.raises(CheckpointError, match="cannot read its weights") as error:
        load_model(str(saved_tiny))
    assert "\n" not in str(error.value)


def test_truncated_conversion_inputs_are_one_line(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 20)
    with pytest.raises(ConversionError, match="truncated: tensor w ends at byte"):
        list(read_safetensors(str(tmp_path / "model.safetensors")))
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a zip cut before its end
    with pytest.raises(ConversionError, match="truncated"):
        list(read_torch_bin(str(tmp_path / "pytorch_model.bin")))


def test_outputs_are_written_with_the_users_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_json_atomic(str(tmp_path / "a.json"), {"x": 1})
        write_jsonl_atomic(str(tmp_path / "b.jsonl"), [{"x": 1}])
        plot_training_curve([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}], str(tmp_path / CURVE_FILE))
    finally:
        os.umask(previous)
    for name in ("a.json", "b.jsonl", CURVE_FILE):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


def test_a_stop_right_after_an_atomic_rename_is_still_a_stop(tmp_path, monkeypatch):
    rename = os.replace

    def rename_then_ctrl_c(source, target):
        rename(source, target)
        raise KeyboardInterrupt  # SIGINT/SIGTERM handled in the next bytecode, still inside atomic_file

    monkeypatch.setattr(glm.files.os, "replace", rename_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):  # not a FileNotFoundError removing the renamed temporary
        write_json_atomic(str(tmp_path / "a.json"), {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1} and os.listdir(tmp_path) == ["a.json"]


def test_results_and_state_are_replaced_whole(micro_model, micro_data, tmp_path):  # noqa: F811
    trainer = run(micro_model, micro_data, tmp_path, "--do_train", "--max_steps", "1")
    written = {name: (tmp_path / name).read_bytes() for name in ("train_results.json", "all_results.json", "trainer_state.json")}
    with pytest.raises(TypeError):  # a write that fails midway, as a kill or a full disk would stop it
        trainer.save_metrics("train", {"train_loss": 1.0, "unwritable": object()})
    trainer.state.log_history.append({"unwritable": object()})
    with pytest.raises(TypeError):
        trainer.save_state()
    assert {name: (tmp_path / name).read_bytes() for name in written} == written
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_base_is_hashed_once_while_its_files_stay_the_same(saved_tiny, monkeypatch):
    monkeypatch.setattr(glm.files, "SHA256_CACHE_MIN_BYTES", 0)  # the tiny base stands for a 20 GB one
    config = glm.GLMConfig.from_pretrained(str(saved_tiny))
    first = base_fingerprint(str(saved_tiny), config)
    cache_file = saved_tiny / glm.files.SHA256_CACHE
    cache = json.loads(cache_file.read_text())
    (entry,) = cache.values()
    assert entry["sha256"] == first["weights_sha256"]
    cache_file.write_text(json.dumps({key: dict(value, sha256="from the cache") for key, value in cache.items()}))
    assert base_fingerprint(str(saved_tiny), config)["weights_sha256"] == "from the cache"  # not read again
    os.utime(saved_tiny / "model_state.pdparams")  # rewritten (a new mtime): hashed again
    assert base_fingerprint(str(saved_tiny), config) == first


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora", "true", "--lora_rank", "0"], "--lora_rank must be at least 1; got 0"),
        (["--lora", "true", "--lora_target_modules", ".*nothing.*"], "match no Linear layer"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1"),
        (["--resume_from_checkpoint", "{tmp}/missing"], "--resume_from_checkpoint {tmp}/missing: no such directory"),
        (["--max_eval_samples", "-2"], "--max_eval_samples must be at least 1; got -2"),
        (["--output_dir", "{tmp}/file/out"], "cannot write there (Not a directory)"),
    ],
)
def test_finetune_bad_flags_are_one_line(micro_weights_model, micro_data, tmp_path, capsys, flags, message):  # noqa: F811
    (tmp_path / "file").write_text("a file, not a directory")
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    exits_with_one_line(
        capsys, lambda: run(micro_weights_model, micro_data, tmp_path / "out", "--do_train", "--max_steps", "1", *flags),
        message.format(tmp=tmp_path),
    )


def test_data_file_problems(micro_model, micro_data, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(micro_data, data)
    os.remove(data / "train.json")
    (data / "train.json").mkdir()
    exits_with_one_line(capsys, lambda: run(micro_model, str(data), tmp_path / "out", "--do_train"), "train.json is a directory")
    assert not (tmp_path / "out").exists()  # a refused run leaves no empty --output_dir
    os.rmdir(data / "train.json")
    with open(data / "train.json", "w", encoding="utf-8") as f:
        f.write('{"content": "类型#裙", "summary": ""}\n')
    exits_with_one_line(capsys, lambda: run(micro_model, str(data), tmp_path / "a" / "b", "--do_train"), "'summary' is empty")
    assert not (tmp_path / "a").exists()  # nor the directories made for it


def test_a_model_with_non_finite_weights_is_refused(saved_tiny):
    state = paddle.load(str(saved_tiny / "model_state.pdparams"))
    state["glm.word_embeddings.weight"][0, 0] = float("nan")
    paddle.save(state, str(saved_tiny / "model_state.pdparams"))
    with pytest.raises(CheckpointError, match="glm.word_embeddings.weight holds NaN or inf"):
        load_model(str(saved_tiny))

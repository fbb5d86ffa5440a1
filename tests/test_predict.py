"""predict_generation.py: outputs, LoRA adapters, resume from a partial file, defaults, bad input."""

import json
import os
import shutil
import socket
import subprocess
import sys

import paddle
import pytest
from conftest import ROOT
from test_finetune import cli, micro_data, micro_model, micro_weights_model, run  # noqa: F401  (fixtures)

import glm.files
import predict_generation
from glm import GLMConfig, GLMForConditionalGeneration
from glm.files import CRASH_AT_VARIABLE, CRASH_SIGNAL_VARIABLE
from glm.lora_merge import merge_lora_checkpoint


@pytest.fixture(scope="module")
def trained(micro_model, micro_data, tmp_path_factory):  # noqa: F811
    """A micro GLM finetuned a few steps, and a LoRA adapter trained on top of it."""
    base = tmp_path_factory.mktemp("base")
    run(micro_model, micro_data, base, "--do_train", "--max_steps", "8", "--learning_rate", "1e-2")
    adapter = tmp_path_factory.mktemp("adapter")
    run(
        str(base), micro_data, adapter, "--do_train", "--max_steps", "6", "--learning_rate", "5e-2", "--lora", "true",
        "--lora_rank", "4", "--lora_target_modules", ".*query_key_value.*", ".*mlp.*",
    )  # fmt: skip
    return str(base), str(adapter)


def predict(*flags, data_file=None, output_file=None):
    argv = ["--min_tgt_length", "3", "--tgt_length", "12", "--num_beams", "2", "--batch_size", "4", *flags]
    if data_file:
        argv += ["--data_file", str(data_file)]
    if output_file:
        argv += ["--output_file", str(output_file)]
    predict_generation.main(argv)
    return [json.loads(line) for line in open(output_file, encoding="utf-8")] if output_file else None


def test_rows_keep_their_fields_and_gain_a_prediction(trained, micro_data, tmp_path):  # noqa: F811
    base, _ = trained
    rows = predict("--model_name_or_path", base, data_file=os.path.join(micro_data, "dev.json"), output_file=tmp_path / "o.jsonl")
    inputs = [json.loads(line) for line in open(os.path.join(micro_data, "dev.json"), encoding="utf-8")]
    assert len(rows) == len(inputs)
    for row, source in zip(rows, inputs):
        assert {k: row[k] for k in source} == source
        assert isinstance(row["prediction"], str) and row["prediction"]
    # the settings the checkpoint was trained with are the defaults (src_length 40 from the finetune run)
    settings = json.load(open(os.path.join(base, "generation_settings.json")))
    assert settings["src_length"] == 40


def test_lora_adapter_changes_the_output_and_equals_the_merged_model(trained, micro_data, tmp_path):  # noqa: F811
    base, adapter = trained
    data = os.path.join(micro_data, "dev.json")
    plain = predict("--model_name_or_path", base, data_file=data, output_file=tmp_path / "base.jsonl")
    adapted = predict("--model_name_or_path", base, "--lora_path", adapter, data_file=data, output_file=tmp_path / "lora.jsonl")
    merge_lora_checkpoint(base, adapter, str(tmp_path / "merged"))
    merged = predict("--model_name_or_path", str(tmp_path / "merged"), "--src_length", "40", data_file=data,
                     output_file=tmp_path / "merged.jsonl")  # fmt: skip
    assert [r["prediction"] for r in adapted] != [r["prediction"] for r in plain]
    assert [r["prediction"] for r in adapted] == [r["prediction"] for r in merged]


def test_a_partial_output_is_resumed_only_from_the_same_inputs(trained, micro_data, tmp_path):  # noqa: F811
    base, _ = trained
    data = os.path.join(micro_data, "dev.json")
    output = tmp_path / "out.jsonl"
    whole = predict("--model_name_or_path", base, data_file=data, output_file=tmp_path / "whole.jsonl")
    # What a killed run leaves: its sidecar, the first rows and a torn last line.
    fingerprint = predict_generation.output_fingerprint(
        *predict_generation.parse_arguments(["--min_tgt_length", "3", "--tgt_length", "12", "--num_beams", "2",
                                             "--model_name_or_path", base, "--data_file", data, "--output_file", str(output)])
    )  # fmt: skip
    (tmp_path / "out.jsonl.partial.json").write_text(json.dumps(fingerprint))
    kept = dict(whole[0], prediction="KEPT FROM THE KILLED RUN")
    (tmp_path / "out.jsonl.partial").write_text(json.dumps(kept, ensure_ascii=False) + '\n{"content": "torn', encoding="utf-8")
    with pytest.raises(SystemExit):  # another flag than the killed run's: refused, the partial file kept
        predict("--model_name_or_path", base, "--num_return_sequences", "2", data_file=data, output_file=output)
    assert (tmp_path / "out.jsonl.partial").exists() and not output.exists()
    rows = predict("--model_name_or_path", base, data_file=data, output_file=output)
    assert rows[0]["prediction"] == "KEPT FROM THE KILLED RUN"  # not decoded again
    assert rows[1:] == whole[1:]
    assert not (tmp_path / "out.jsonl.partial").exists() and not (tmp_path / "out.jsonl.partial.json").exists()


def test_a_partial_output_from_another_input_file_is_refused_or_overwritten(trained, micro_data, tmp_path, capsys):  # noqa: F811
    base, _ = trained
    data = os.path.join(micro_data, "dev.json")
    (tmp_path / "other.json").write_text(open(data, encoding="utf-8").readline(), encoding="utf-8")
    output = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.partial").write_text('{"content": "from another file", "prediction": "x"}\n')
    message = "out.jsonl.partial was made from other inputs (differing: data_file_sha256, model, lora, settings)"
    with pytest.raises(SystemExit) as exit_info:
        predict("--model_name_or_path", base, data_file=tmp_path / "other.json", output_file=output)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    rows = predict("--model_name_or_path", base, "--overwrite_output", "true", data_file=tmp_path / "other.json", output_file=output)
    assert len(rows) == 1 and rows[0]["content"] != "from another file"


def test_several_blanks_are_filled_and_shown(trained, tmp_path):
    base, _ = trained
    (tmp_path / "in.json").write_text(json.dumps({"src": "这款[MASK]的裙子，[sMASK]"}, ensure_ascii=False) + "\n", encoding="utf-8")
    row = predict("--model_name_or_path", base, data_file=tmp_path / "in.json", output_file=tmp_path / "o.jsonl")[0]
    assert isinstance(row["prediction"], list) and len(row["prediction"]) == 2
    assert row["filled"] == f"这款{row['prediction'][0]}的裙子，{row['prediction'][1]}"


def test_stdin_prompts_one_per_line(trained):
    base, _ = trained
    result = cli("predict_generation.py", "--model_name_or_path", base, "--num_beams", "2", "--tgt_length", "8",
                 input="类型#裙*颜色#红色\n\n类型#裤\n")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["source"] for o in outputs] == ["类型#裙*颜色#红色", "类型#裤"]
    assert all(o["prediction"] for o in outputs)


def test_built_in_defaults_that_do_not_fit_the_model_come_down_to_it_with_one_note(micro_weights_model):  # noqa: F811
    """A model without generation_settings.json (max_sequence_length 128): the built-in 608/160 come down to
    128 and the built-in min_tgt_length 55 to a given --tgt_length; a value the user gave is never changed."""
    result = cli("predict_generation.py", "--model_name_or_path", micro_weights_model, "--num_beams", "1",
                 "--decode_strategy", "greedy_search", input="类型#裙\n")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    settings = next(line for line in result.stderr.splitlines() if line.startswith("settings"))
    assert "src_length 128, tgt_length 128," in settings
    assert "src_length 608 → 128 (the model's max_sequence_length), tgt_length 160 → 128" in settings, settings
    result = cli("predict_generation.py", "--model_name_or_path", micro_weights_model, "--tgt_length", "8",
                 "--num_beams", "2", input="类型#裙\n")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    settings = next(line for line in result.stderr.splitlines() if line.startswith("settings"))
    assert "min_tgt_length 8," in settings and "min_tgt_length 55 → 8 (tgt_length)" in settings, settings
    result = cli("predict_generation.py", "--model_name_or_path", micro_weights_model, "--tgt_length", "8",
                 "--min_tgt_length", "55", input="类型#裙\n")  # fmt: skip
    assert result.returncode == 2 and "min_tgt_length" in result.stderr.strip().splitlines()[-1]


def test_an_adapter_brings_its_own_settings_before_the_bases(trained, tmp_path):
    """An adapter trained with other lengths or decoding is predicted with them (its generation_settings.json)."""
    base, adapter = trained
    mine = tmp_path / "adapter"
    shutil.copytree(adapter, mine)
    settings = json.loads((mine / "generation_settings.json").read_text())
    (mine / "generation_settings.json").write_text(json.dumps(dict(settings, tgt_length=9, num_beams=3)))
    result = cli("predict_generation.py", "--model_name_or_path", base, "--lora_path", str(mine), "--min_tgt_length", "0",
                 input="类型#裙\n")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stderr.splitlines() if line.startswith("settings"))
    assert "tgt_length 9," in line and "3 beams" in line, line
    assert f"then {mine / 'generation_settings.json'}, then " in line, line


def test_empty_answers_are_said_once_with_the_way_out(capsys):
    assert predict_generation.is_empty({"prediction": ""}) and predict_generation.is_empty({"prediction": ["a", ""]})
    assert not predict_generation.is_empty({"prediction": "a"})
    predict_generation.say_empty_answers(0, 5, 0)
    assert capsys.readouterr().err == ""
    predict_generation.say_empty_answers(2, 5, 0)
    assert "2 of 5 answers are empty" in capsys.readouterr().err


def test_a_missing_model_is_said_before_any_settings(tmp_path, capsys):
    with pytest.raises(SystemExit):
        predict_generation.main(["--model_name_or_path", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert "no such model directory" in err and "settings" not in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model_name_or_path", "{tmp}/none"], "no such model directory"),
        (["--data_file", "{tmp}/missing.json"], "missing.json: no such file"),
        (["--lora_path", "{tmp}"], "no lora_config.json"),
        (["--batch_size", "0"], "--batch_size must be at least 1; got 0"),
        (["--output_file", "{tmp}"], "is a directory; give a file name"),
        (["--output_file", "{tmp}/no/such/out.jsonl"], "no such directory"),
        (["--dtype", "bfloat16"], "needs a GPU"),
        (["--tgt_length", "500"], "exceeds the model's max_sequence_length"),
        (["--decode_strategy", "beam"], "decode_strategy must be one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys, flags, message):
    base, _ = trained
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        predict_generation.main(["--model_name_or_path", base, *flags])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_stdin_never_truncates_an_existing_output_and_non_utf8_is_one_line(trained, tmp_path):
    base, _ = trained
    output = tmp_path / "out.jsonl"
    output.write_text("EARLIER RESULTS\n")
    result = subprocess.run(
        [sys.executable, "predict_generation.py", "--model_name_or_path", base, "--num_beams", "2", "--tgt_length", "8",
         "--output_file", str(output)],
        input="类型#裙\n".encode() + b"\xff\xfe bad\n", capture_output=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
    )  # fmt: skip
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert result.stderr.decode().strip().splitlines()[-1] == "error: stdin:2: not UTF-8 (byte 0xff at column 1)"
    assert output.read_text() == "EARLIER RESULTS\n"  # nothing replaced without a complete result


def adapter_copy(adapter, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(adapter, copy)
    return copy


def test_adapter_refusals(trained, micro_data, tmp_path, capsys):  # noqa: F811
    base, adapter = trained
    data = os.path.join(micro_data, "dev.json")

    def refused(model, lora, message, *flags):
        with pytest.raises(SystemExit) as exit_info:
            predict("--model_name_or_path", str(model), "--lora_path", str(lora), *flags, data_file=data, output_file=tmp_path / "o.jsonl")
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last

    no_weights = adapter_copy(adapter, tmp_path, "no_weights")
    os.remove(no_weights / "lora_model_state.pdparams")
    refused(base, no_weights, "no lora_model_state.pdparams")

    wider = tmp_path / "wider"  # another base: hidden 64 instead of 32
    shutil.copytree(base, wider, ignore=shutil.ignore_patterns("checkpoint-*", "*.pdparams"))
    config = json.loads((wider / "config.json").read_text())
    config.update(hidden_size=64)
    GLMForConditionalGeneration(GLMConfig(**{k: v for k, v in config.items() if k != "architectures"})).save_pretrained(str(wider))
    refused(wider, adapter, "trained on a different GLM: hidden_size 32 (the adapter's base) vs 64 (this base)")

    twin = tmp_path / "twin"  # same shapes, other weights
    shutil.copytree(base, twin, ignore=shutil.ignore_patterns("checkpoint-*"))
    state = paddle.load(str(twin / "model_state.pdparams"))
    state = {name: value + 0.01 for name, value in state.items()}
    paddle.save(state, str(twin / "model_state.pdparams"))
    refused(twin, adapter, "was trained on another base than")
    rows = predict("--model_name_or_path", str(twin), "--lora_path", adapter, "--force", "true", data_file=data,
                   output_file=tmp_path / "forced.jsonl")  # fmt: skip
    assert len(rows) == 6
    merged = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "merge_lora.py"), "--model_name_or_path", str(twin),
         "--lora_path", adapter, "--output_dir", str(tmp_path / "merged")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert merged.returncode == 2 and "was trained on another base than" in merged.stderr.strip().splitlines()[-1]


def test_a_second_prediction_into_the_same_file_refuses(trained, micro_data, tmp_path, capsys):  # noqa: F811
    base, _ = trained
    output = tmp_path / "out.jsonl"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the first run, still writing
    try:
        (tmp_path / "out.jsonl.lock").write_text(f"{socket.gethostname()} {sleeper.pid}")
        with pytest.raises(SystemExit) as exit_info:
            predict("--model_name_or_path", base, data_file=os.path.join(micro_data, "dev.json"), output_file=output)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: --output_file {output} is being written by another run (pid {sleeper.pid} on "
            f"{socket.gethostname()}; lock {output}.lock): wait for it, or use another --output_file"
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.lock"]  # nothing written, nothing removed
    finally:
        sleeper.kill()
        sleeper.wait()
    rows = predict("--model_name_or_path", base, data_file=os.path.join(micro_data, "dev.json"), output_file=output)
    assert len(rows) == 6 and not (tmp_path / "out.jsonl.lock").exists()  # a lock whose run is gone is taken over


def test_ctrl_c_keeps_the_rows_done_and_says_how_to_go_on(trained, micro_data, tmp_path, capsys, monkeypatch):  # noqa: F811
    base, _ = trained
    output = tmp_path / "out.jsonl"
    flags = ("--model_name_or_path", base, "--batch_size", "1")  # chunks of 8 rows
    lines = open(os.path.join(micro_data, "train.json"), encoding="utf-8").readlines()[:12]
    (tmp_path / "in.json").write_text("".join(lines), encoding="utf-8")
    monkeypatch.setenv(CRASH_AT_VARIABLE, "predict:chunk-written")
    monkeypatch.setenv(CRASH_SIGNAL_VARIABLE, "INT")
    glm.files._crash_counts.clear()
    with pytest.raises(SystemExit) as exit_info:
        predict(*flags, data_file=tmp_path / "in.json", output_file=output)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"stopped by Ctrl-C (SIGINT): rerunning the same command continues after the rows already in {output}.partial"
    )
    assert len(open(f"{output}.partial", encoding="utf-8").readlines()) == 8 and not (tmp_path / "out.jsonl.lock").exists()
    monkeypatch.delenv(CRASH_AT_VARIABLE)
    assert len(predict(*flags, data_file=tmp_path / "in.json", output_file=output)) == 12


def test_a_model_without_its_sentencepiece_file_and_cut_sources_are_said(trained, micro_data, tmp_path, capsys, caplog):  # noqa: F811
    base, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(base, broken, ignore=shutil.ignore_patterns("checkpoint-*", "cog-pretrain.model"))
    with pytest.raises(SystemExit) as exit_info:
        predict("--model_name_or_path", str(broken), data_file=os.path.join(micro_data, "dev.json"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {broken}: no cog-pretrain.model, the vocabulary file its GLMChineseTokenizer needs"
    )
    predict("--model_name_or_path", base, "--src_length", "8", data_file=os.path.join(micro_data, "dev.json"),
            output_file=tmp_path / "o.jsonl")  # fmt: skip
    assert "dev.json: 6 of 6 sources cut to src_length=8 tokens" in caplog.text

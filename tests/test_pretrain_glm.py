"""pretrain_glm.py and tools/prepare_pretraining_data.py as a user runs them: a run learns and reports the
held-out loss per objective, evaluate.py takes its checkpoint, --dump_examples writes what training draws,
bad input is one line and exit 2 with nothing written, kills (of training and of preparation) are
finished by rerunning the same command."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import paddle
import pytest
from conftest import ROOT, shared_path
from test_finetune import micro_model  # noqa: F401  (fixture)
from test_pretraining_objective import restored

import evaluate
import pretrain_glm
from glm.files import CRASH_AT_VARIABLE
from glm.inputs import collate_examples
from glm.pretraining.corpus import prepare_corpus
from glm.pretraining.objective import PretrainingExample
from glm.tokenization import load_tokenizer, special_token_ids

TINY = os.path.join(ROOT, "configs", "glm-tiny-chinese")
TINY_IDS = special_token_ids(load_tokenizer(TINY))
FLAGS = (
    "--seq_length", "64", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
    "--learning_rate", "3e-3", "--warmup_steps", "0", "--logging_steps", "1", "--eval_windows", "8", "--seed", "7",
    "--disable_tqdm", "true", "--report_to", "none", "--device", "cpu",
)  # fmt: skip


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Corpora of the demo ad copy (300 training, 40 held-out documents) with the tiny default's tokenizer."""
    path = tmp_path_factory.mktemp("pretraining-corpora")
    tokenizer = load_tokenizer(TINY)
    for split, count in (("train", 300), ("dev", 40)):
        with open(os.path.join(ROOT, "demo_data", f"{split}.json"), encoding="utf-8") as f:
            (path / f"{split}.jsonl").write_text("".join(f.readlines()[:count]), encoding="utf-8")
        prepare_corpus([str(path / f"{split}.jsonl")], str(path / split), tokenizer, text_key="summary")
    return {"train": str(path / "train"), "dev": str(path / "dev")}


def run(model, corpora, output_dir, *flags):
    argv = ["--model_name_or_path", model, "--corpus_dir", corpora["train"], "--eval_corpus_dir", corpora["dev"],
            "--output_dir", str(output_dir), *FLAGS, *flags]
    with paddle.utils.unique_name.guard():  # fresh parameter names, as in a new process
        return pretrain_glm.main(argv)


@pytest.fixture(scope="module")
def trained(micro_model, corpora, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("pretrained")
    trainer = run(micro_model, corpora, output, "--do_train", "--do_eval", "--max_steps", "24", "--evaluation_strategy", "steps",
                  "--eval_steps", "12", "--eval_before_training", "true", "--save_steps", "1000")
    return trainer, output


def test_a_run_learns_and_reports_the_held_out_loss_per_objective(trained):
    _, output = trained
    untrained = json.loads((output / "untrained_results.json").read_text())
    results = json.loads((output / "eval_results.json").read_text())
    for objective in ("token", "sentence", "document"):
        assert results[f"eval_loss_{objective}"] < untrained[f"untrained_loss_{objective}"] - 0.5
    state = json.loads((output / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_loss_token" in e] == [12, 24]  # at --eval_steps
    assert (output / "training_curve.png").stat().st_size > 0
    settings = json.loads((output / "pretraining_settings.json").read_text())
    assert settings["objective"]["seq_length"] == 64 and settings["corpus"]["documents"] == 300


def test_a_rerun_with_another_objective_or_corpus_is_refused_naming_it(trained, micro_model, corpora, capsys, tmp_path):  # noqa: F811
    """The objective's flags and the corpus's content are part of the run's record (run_record.py)."""
    _, output = trained
    flags = ("--do_train", "--do_eval", "--max_steps", "24", "--evaluation_strategy", "steps", "--eval_steps", "12",
             "--eval_before_training", "true", "--save_steps", "1000")
    other = prepared_elsewhere(tmp_path, "other", "这款上衣很有看点,长袖设计方便活动,秋季穿搭正合适。\n" * 30)
    for change, named in ((["--bert_prob", "0.5"], "--bert_prob 0.4 → 0.5"), (["--corpus_dir", other], "--corpus_dir")):
        with pytest.raises(SystemExit) as exit_info:
            run(micro_model, corpora, output, *flags, *change)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "holds a finished run with other settings" in error and named in error, error


@pytest.mark.parametrize("task, data", [("lm", "text"), ("lambada", "words")])
def test_evaluate_takes_the_checkpoint_as_it_is(trained, tmp_path, task, data):
    _, output = trained
    lines = ["这款上衣很有看点,长袖设计方便活动。", "碎花元素很有看点,秋季穿搭正合适。"]
    words = ["这款 上衣 很 有 看点", "碎花 元素 很 有 看点"]
    (tmp_path / "data.txt").write_text("\n".join(lines if data == "text" else words) + "\n", encoding="utf-8")
    results = evaluate.main(["--task", task, "--model_name_or_path", str(output), "--data_file", str(tmp_path / "data.txt")])
    assert ("perplexity" in results) if task == "lm" else (0 <= results["accuracy"] <= 100)


def test_predict_takes_the_checkpoint_as_it_is(trained):
    """The checkpoint carries decoding settings that fit it: sources of a window, no minimum answer length."""
    _, output = trained
    settings = json.loads((output / "generation_settings.json").read_text())
    assert (settings["src_length"], settings["tgt_length"], settings["min_tgt_length"]) == (64, 64, 0)
    result = cli("predict_generation.py", "--model_name_or_path", str(output), "--num_beams", "2",
                 input="这款[MASK]的裙子很有看点。\n")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert isinstance(json.loads(result.stdout)["prediction"], str)


def test_dump_examples_are_the_batches_training_draws(trained, micro_model, corpora, tmp_path):  # noqa: F811
    trainer, _ = trained
    dump = tmp_path / "examples.jsonl"
    assert run(micro_model, corpora, tmp_path / "unused", "--dump_examples", str(dump), "--dump_count", "9") is None
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 9 and not (tmp_path / "unused").exists()
    assert set(rows[0]) == {"input_ids", "position_ids", "sep", "labels", "loss_mask", "objective", "window"}
    for row in rows:
        assert len(row["position_ids"]) == 2 and row["objective"] in ("token", "sentence", "document")
        assert restored(PretrainingExample(**row), TINY_IDS) == row["window"]
    first = next(iter(trainer.get_train_dataloader()))  # the run's first batch of 4 rows
    built = collate_examples([PretrainingExample(**row).features() for row in rows[: len(first["input_ids"])]],
                             TINY_IDS.pad)
    for name, value in built.items():
        np.testing.assert_array_equal(first[name].numpy(), value, err_msg=name)


@pytest.mark.parametrize("recipe", sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if "pretrain" in n))
def test_shipped_pretraining_recipes_parse(recipe):
    _, corpus_args, objective_args, training_args = pretrain_glm.parse_pretraining_arguments(
        [os.path.join(ROOT, "configs", recipe), "--output_dir", "unused", "--corpus_dir", "unused"])
    assert objective_args.problem() is None and training_args.do_train and training_args.do_eval
    assert str(training_args.evaluation_strategy.value) == "steps" and corpus_args.eval_windows >= 64


def prepared_elsewhere(tmp_path, name, text):
    (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    prepare_corpus([str(tmp_path / f"{name}.txt")], str(tmp_path / name), load_tokenizer(TINY))
    return str(tmp_path / name)


def test_bad_input_is_one_line_exit_2_and_nothing_written(micro_model, corpora, tmp_path, capsys):  # noqa: F811
    from paddlenlp.transformers import GLMChineseTokenizer

    real = tmp_path / "real-tokenizer"
    GLMChineseTokenizer.from_pretrained(os.path.dirname(shared_path("tokenizers", "glm-chinese", "cog-pretrain.model"))
                                        ).save_pretrained(str(real))
    for name in ("config.json",):
        os.symlink(os.path.join(micro_model, name), real / name)
    tiny_corpus = prepared_elsewhere(tmp_path, "tiny", "这款上衣很有看点。\n")
    cases = [
        (["--corpus_dir", str(tmp_path)], f"{tmp_path} is not a prepared corpus (no corpus.json)"),
        (["--seq_length", "200"], "--seq_length 200 exceeds the model's max_sequence_length 128"),
        (["--bert_ratio", "1.5"], "--bert_ratio must be between 0 and 1; got 1.5"),
        (["--bert_prob", "0.8", "--gap_sentence_prob", "0.3"], "--bert_prob 0.8 + --gap_sentence_prob 0.3 exceed 1"),
        (["--model_name_or_path", str(real)], f"was prepared with another tokenizer than {real}'s"),
        (["--corpus_dir", tiny_corpus], f"{tiny_corpus} holds 8 tokens (with [CLS] and <|endoftext|>), fewer than one "
                                        "window of --seq_length 64"),
    ]
    for flags, message in cases:
        output = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            run(micro_model, corpora, output, "--max_steps", "2", *flags)
        assert exit_info.value.code == 2, flags
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: ") and message in error, (flags, error)
        assert not output.exists(), flags


def test_a_refused_run_prepares_no_default_corpus(tmp_path, monkeypatch, capsys):
    """The embedded default's corpora are made on first use, but not for a run that is refused: bad flags,
    or a named corpus that is not a prepared one (the default held-out corpus would have been made first)."""
    monkeypatch.setattr(pretrain_glm, "DEMO_CORPORA", {str(tmp_path / "demo-train"): os.path.join(ROOT, "demo_data", "train.json"),
                                                       str(tmp_path / "demo-dev"): os.path.join(ROOT, "demo_data", "dev.json")})
    for flags in (["--corpus_dir", str(tmp_path / "nowhere")], ["--bert_ratio", "1.5"]):
        with pytest.raises(SystemExit) as exit_info:
            pretrain_glm.main([*flags, "--output_dir", str(tmp_path / "out")])
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
        assert sorted(os.listdir(tmp_path)) == [], flags


def cli(*args, crash_at=None, input=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(CRASH_AT_VARIABLE, None)
    if crash_at:
        env[CRASH_AT_VARIABLE] = crash_at
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          input=input)


def pretrain_cli(model, corpora, output, crash_at=None):
    return cli("pretrain_glm.py", "--model_name_or_path", model, "--corpus_dir", corpora["train"], "--output_dir",
               str(output), *FLAGS, "--do_train", "--max_steps", "6", "--save_steps", "2", crash_at=crash_at)


def weights(directory):
    return paddle.load(os.path.join(directory, "model_state.pdparams"), return_numpy=True)


def test_a_killed_run_rerun_ends_with_the_uninterrupted_runs_weights(micro_model, corpora, tmp_path):  # noqa: F811
    """Killed while writing checkpoint-4, the rerun resumes checkpoint-2: steps 3 to 6 must draw the very
    batches of the uninterrupted run (tests/test_faults.py kills finetuning at every point of the save path)."""
    whole = pretrain_cli(micro_model, corpora, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = pretrain_cli(micro_model, corpora, tmp_path / "killed", crash_at="torn:model_state.pdparams#2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    rerun = pretrain_cli(micro_model, corpora, tmp_path / "killed")
    assert rerun.returncode == 0 and "resuming" in rerun.stderr, rerun.stderr[-3000:]
    final, expected = weights(tmp_path / "killed"), weights(tmp_path / "whole")
    for name in expected:  # the resumed run drew exactly the batches of the uninterrupted one
        np.testing.assert_array_equal(final[name], expected[name], err_msg=name)


def test_data_parallel_on_two_cpu_processes(micro_model, corpora, tmp_path):  # noqa: F811
    result = cli("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "log"),
                 "pretrain_glm.py", "--model_name_or_path", micro_model, "--corpus_dir", corpora["train"],
                 "--eval_corpus_dir", corpora["dev"], "--output_dir", str(tmp_path / "out"), *FLAGS, "--do_train",
                 "--do_eval", "--max_steps", "2")  # fmt: skip
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "log").glob("*"))
    assert result.returncode == 0, (result.stderr + logs)[-4000:]
    assert "train    2 steps of 8 rows" in logs and "2 processes on cpu" in logs  # 4 rows on each of 2 ranks
    gathered = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    run(str(tmp_path / "out"), corpora, tmp_path / "one-process", "--do_eval")  # the same model, one process
    alone = json.loads((tmp_path / "one-process" / "eval_results.json").read_text())
    for objective in ("token", "sentence", "document"):  # each rank scored its share; the sums were gathered
        assert gathered[f"eval_loss_{objective}"] == pytest.approx(alone[f"eval_loss_{objective}"], rel=1e-5)


def prepare_cli(output, *inputs, crash_at=None):
    return cli(os.path.join("tools", "prepare_pretraining_data.py"), "--input", *inputs, "--output_dir", str(output),
               "--model_name_or_path", TINY, "--text_key", "summary", "--workers", "2", crash_at=crash_at)


def test_a_killed_preparation_leaves_nothing_a_run_accepts_and_a_rerun_finishes(tmp_path):
    source = os.path.join(ROOT, "demo_data", "train.json")
    killed = prepare_cli(tmp_path / "corpus", source, crash_at="prepare:chunk-written#2")
    assert killed.returncode == -signal.SIGKILL
    staged = os.listdir(tmp_path)  # no corpus, the killed preparation's staging: open_corpus refuses the directory
    assert len(staged) == 1 and re.fullmatch(r"corpus\.partial-\d+", staged[0]), staged
    again = prepare_cli(tmp_path / "corpus", source)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["corpus"]
    summary = again.stderr.strip().splitlines()[-1]
    assert "3,000 documents, 73,694 tokens ([UNK] 0.00 %), 0.7 MiB of text -> 0.2 MiB (uint16 tokens)" in summary
    assert "tokenizing with 2 workers" in again.stderr  # the progress bar


def test_the_preparation_tool_says_bad_input_in_one_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare", os.path.join(ROOT, "tools", "prepare_pretraining_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--input", str(tmp_path / "bad.txt"), "--output_dir", str(tmp_path / "out"), "--model_name_or_path", TINY])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {tmp_path / 'bad.txt'}:2: not UTF-8 (byte 0xff at column 1)"

"""finetune_cloze.py: it learns, evaluation (accuracy, predictions) agrees with evaluate.py, LoRA, the
embedded example is what its tool builds, bad input is one line."""

import importlib.util
import json
import os

import numpy as np
import paddle
import pytest
from conftest import ROOT
from test_finetune import micro_model  # noqa: F401  (fixture)

import evaluate
import finetune_cloze


@pytest.fixture(scope="module")
def micro_cloze(tmp_path_factory):
    """96 training and 16 dev rows of the embedded cloze example."""
    path = tmp_path_factory.mktemp("micro-cloze")
    for split, count in (("train", 96), ("dev", 16)):
        with open(os.path.join(ROOT, "demo_data", "cloze", f"{split}.json"), encoding="utf-8") as f:
            (path / f"{split}.json").write_text("".join(f.readlines()[:count]), encoding="utf-8")
    return str(path)


def run(model, data, output_dir, *flags):
    argv = [
        "--model_name_or_path", model, "--dataset_name_or_path", data, "--output_dir", str(output_dir),
        "--src_length", "48", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "8",
        "--learning_rate", "3e-3", "--warmup_steps", "0", "--logging_steps", "1", "--save_steps", "1000",
        "--seed", "7", "--disable_tqdm", "true", "--report_to", "none", "--device", "cpu", *flags,
    ]  # fmt: skip
    with paddle.utils.unique_name.guard():
        return finetune_cloze.main(argv)


@pytest.fixture(scope="module")
def trained(micro_model, micro_cloze, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("cloze")
    trainer = run(micro_model, micro_cloze, output, "--max_steps", "18", "--eval_before_training", "true")
    return trainer, output


def test_cloze_finetuning_learns_and_reports_accuracy(trained):
    trainer, output = trained
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.2
    results = json.loads((output / "eval_results.json").read_text())
    untrained = json.loads((output / "untrained_results.json").read_text())
    assert results["eval_loss"] < untrained["untrained_loss"]
    rows = [json.loads(line) for line in (output / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {"inputs_pretokenized", "choices_pretokenized", "label", "prediction", "scores"} <= set(rows[0])
    right = sum(row["prediction"] == row["label"] for row in rows)
    assert results["eval_accuracy"] == pytest.approx(100 * right / 16)
    assert json.loads((output / "config.json").read_text())["architectures"] == ["GLMForMultipleChoice"]


def test_evaluate_py_agrees_with_the_training_evaluation(trained, micro_cloze, tmp_path):
    _, output = trained
    with paddle.utils.unique_name.guard():
        results = evaluate.main(["--task", "multiple_choice", "--model_name_or_path", str(output), "--src_length", "48",
                                 "--data_file", os.path.join(micro_cloze, "dev.json"), "--output_file", str(tmp_path / "r.json")])  # fmt: skip
    assert results["accuracy"] == json.loads((output / "eval_results.json").read_text())["eval_accuracy"]
    ours = [json.loads(line)["scores"] for line in (tmp_path / "r.predictions.jsonl").read_text().splitlines()]
    theirs = [json.loads(line)["scores"] for line in (output / "eval_predictions.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_lora_saves_only_the_adapter_and_evaluate_applies_it(trained, micro_cloze, tmp_path):
    _, base = trained
    adapter = tmp_path / "adapter"
    run(str(base), micro_cloze, adapter, "--max_steps", "4", "--learning_rate", "5e-2", "--lora", "true",
        "--lora_rank", "4", "--lora_target_modules", ".*query_key_value.*", ".*mlp.*")  # fmt: skip
    assert (adapter / "lora_model_state.pdparams").exists() and not (adapter / "model_state.pdparams").exists()
    with paddle.utils.unique_name.guard():
        results = evaluate.main(["--task", "multiple_choice", "--model_name_or_path", str(base), "--lora_path", str(adapter),
                                 "--src_length", "48", "--data_file", os.path.join(micro_cloze, "dev.json")])  # fmt: skip
    assert results["accuracy"] == json.loads((adapter / "eval_results.json").read_text())["eval_accuracy"]


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"inputs_pretokenized": "这款[MASK]", "choices_pretokenized": ["鞋"], "label": 0}', "must be a list of at least two strings"),
        ('{"inputs_pretokenized": "这款[MASK]", "choices_pretokenized": ["鞋", "包"], "label": "鞋"}', "'label' must be a choice index 0..1"),
        ('{"inputs_pretokenized": "", "choices_pretokenized": ["鞋", "包"], "label": 0}', "'inputs_pretokenized' must be a non-empty string"),
        ("not json", "not valid JSON"),
        # The right one of two equal choices can never win (a tie broken by float noise).
        ('{"inputs_pretokenized": "这款[MASK]", "choices_pretokenized": ["鞋", "包", "鞋 "], "label": 0}',
         "choices 0 and 2 are the same ('鞋 ')"),
        ('{"inputs_pretokenized": "这款[MASK]配[MASK]", "choices_pretokenized": ["鞋", "包"], "label": 0}',
         "'inputs_pretokenized' holds 2 blanks ([MASK], [MASK]); a choice fills one"),
    ],
)
def test_bad_rows_are_one_line_and_exit_2(micro_model, micro_cloze, tmp_path, capsys, row, message):  # noqa: F811
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev"):
        text = open(os.path.join(micro_cloze, f"{split}.json"), encoding="utf-8").read()
        (data / f"{split}.json").write_text(text + (row + "\n" if split == "train" else ""), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        run(micro_model, str(data), tmp_path / "out", "--max_steps", "1")
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: train.json:97: ") and message in last


def test_label_smoothing_is_refused_not_ignored(micro_model, micro_cloze, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exit_:
        run(micro_model, micro_cloze, tmp_path / "out", "--max_steps", "1", "--label_smoothing", "0.1")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --label_smoothing 0.1: it applies to generation's token loss (finetune_generation.py); the choice "
        "loss is THUDM's plain cross-entropy, so leave it at 0"
    )
    assert not (tmp_path / "out").exists()


def test_embedded_cloze_example_is_what_its_tool_builds(tmp_path):
    spec = importlib.util.spec_from_file_location("build_cloze_demo", os.path.join(ROOT, "tools", "build_cloze_demo.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--output_dir", str(tmp_path)])
    for split in ("train", "dev"):
        committed = open(os.path.join(ROOT, "demo_data", "cloze", f"{split}.json"), "rb").read()
        assert (tmp_path / f"{split}.json").read_bytes() == committed
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "demo_data", "cloze", "dev.json"), encoding="utf-8")]
    assert all("[MASK]" in r["inputs_pretokenized"] and r["choices_pretokenized"] == tool.CATEGORIES for r in rows)


@pytest.mark.parametrize("recipe", ["tiny-cloze.json", "real-sentiment-cloze.json"])
def test_cloze_recipes_parse(recipe):
    _, data_args, _, training_args = finetune_cloze.parse_cloze_arguments(
        [os.path.join(ROOT, "configs", recipe), "--output_dir", "unused"]
    )
    assert training_args.do_train and training_args.do_eval and data_args.src_length <= 256


@pytest.mark.parametrize("flag", [["--evaluation_strategy", "no"], ["--evaluation_strategy=no"]])
def test_evaluation_strategy_no_means_one_evaluation_at_the_end(flag, capsys):
    # PaddleNLP turns `no` with do_eval into an evaluation every logging_steps (1000 rows scored every 4 steps).
    _, _, _, training_args = finetune_cloze.parse_cloze_arguments(
        [os.path.join(ROOT, "configs", "real-sentiment-cloze-500.json"), "--output_dir", "unused", *flag])
    assert str(training_args.evaluation_strategy.value) == "no" and training_args.do_eval
    assert "evaluation_strategy reset" not in capsys.readouterr().err

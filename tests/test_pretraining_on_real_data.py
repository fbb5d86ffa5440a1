"""tools/pretraining_on_real_data.py's downstream plan and table (no training: the finetuning is faked)
and the export of a pretraining checkpoint as a model directory."""

import argparse
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("pretraining_on_real_data", os.path.join(ROOT, "tools", "pretraining_on_real_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_downstream_sweeps_rates_on_the_first_seed_then_seeds_at_the_best_rate(tool, tmp_path, monkeypatch):
    accuracy = {("random", 3e-4, 1): 70.0, ("random", 3e-4, 2): 66.0, ("random", 3e-4, 3): 68.0,
                ("pre", 1e-3, 1): 60.0, ("pre", 3e-3, 1): 64.0, ("pre", 3e-3, 2): 62.0, ("pre", 3e-3, 3): 63.0}
    calls = []

    def fake_cloze(args, model_dir, data, output, learning_rate=None, seed=None):
        calls.append((model_dir, learning_rate, seed))
        os.makedirs(output, exist_ok=True)
        return {"dev_accuracy": 49.2 if learning_rate is None else accuracy[(model_dir, learning_rate, seed)]}

    monkeypatch.setattr(tool, "cloze", fake_cloze)
    monkeypatch.setattr(tool, "sentiment_data", lambda args: "data")
    args = argparse.Namespace(output_dir=str(tmp_path), zero_shot=True, finetune_learning_rates=[1e-3, 3e-3],
                              random_init_learning_rates=[3e-4], finetune_seeds=[1, 2, 3])
    tool.downstream(args, [("random_init", None, "random"), ("pretrained-reviews", 800, "pre")])
    assert calls == [("random", None, None), ("random", 3e-4, 1), ("random", 3e-4, 2), ("random", 3e-4, 3),
                     ("pre", None, None), ("pre", 1e-3, 1), ("pre", 3e-3, 1), ("pre", 3e-3, 2), ("pre", 3e-3, 3)]
    table = tool.mean_table(tool.measured_rows(str(tmp_path)))  # read back from the run directories
    lines = {(line["model"], line["pretraining_steps"], line["learning_rate"]): line for line in table}
    assert lines[("random_init", 0, "0.0003")]["mean"] == 68.0
    assert lines[("random_init", 0, "0.0003")]["seeds"] == [1, 2, 3]
    assert lines[("pretrained-reviews", 800, "0.003")]["mean"] == 63.0
    assert lines[("pretrained-reviews", 800, "0.001")]["dev_accuracy"] == [60.0]
    assert lines[("pretrained-reviews", 800, "zero-shot")]["seeds"] == [None]
    assert [line["model"] for line in table][0] == "random_init"


def test_a_curve_step_is_the_checkpoint_exported_with_the_final_models_tokenizer(tool, tmp_path):
    pretrained = tmp_path / "pretrained-reviews"
    (pretrained / "checkpoint-200").mkdir(parents=True)
    for name in ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json", "cog-pretrain.model",
                 "generation_settings.json", "pretraining_settings.json", "config.json", "model_state.pdparams",
                 "trainer_state.json"):
        (pretrained / name).write_text("final " + name)
    for name in ("config.json", "model_state.pdparams", "optimizer.pdopt"):
        (pretrained / "checkpoint-200" / name).write_text("step 200 " + name)
    assert tool.curve_model(str(pretrained), 800, 800) == str(pretrained)
    exported = tool.curve_model(str(pretrained), 200, 800)
    assert exported == str(pretrained) + "-step200"
    files = {name: open(os.path.join(exported, name)).read() for name in os.listdir(exported)}
    assert files["model_state.pdparams"] == "step 200 model_state.pdparams"
    assert files["config.json"] == "step 200 config.json"
    assert files["tokenizer_config.json"] == "final tokenizer_config.json"
    assert files["cog-pretrain.model"] == "final cog-pretrain.model"
    assert "optimizer.pdopt" not in files and "trainer_state.json" not in files
    with pytest.raises(SystemExit, match="checkpoint-400 was not saved"):
        tool.curve_model(str(pretrained), 400, 800)


def test_lists_and_flags(tool):
    assert tool.number_list(float)("3e-4,1e-3") == [3e-4, 1e-3]
    assert tool.number_list(int)("300,1000,") == [300, 1000]
    assert tool.boolean("False") is False
    with pytest.raises(argparse.ArgumentTypeError):
        tool.boolean("yes")
    assert json.loads(json.dumps(tool.rate_name(None))) == "zero-shot"

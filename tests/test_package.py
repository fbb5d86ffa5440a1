"""The project's layout: library code in the `glm` package, the root holds what a user runs; the
installed package finetunes, scores multiple choice and evaluates a language model from any directory."""

import ast
import json
import os
import shutil

from conftest import ROOT, run_outside_checkout
from test_finetune import TOKENIZER_FILES, micro_model  # noqa: F401  (fixture)

ROOT_HELPERS = ("data.py", "utils.py")  # the generation task's data conversion and helpers (PaddleNLP's llm/ layout)


def python_files(directory):
    for folder, _, names in os.walk(directory):
        yield from (os.path.join(folder, name) for name in names if name.endswith(".py"))


def imported_modules(path):
    """The top-level names of a file's absolute imports."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_the_package_imports_no_root_module():
    root_modules = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    found = {
        (os.path.relpath(path, ROOT), module)
        for path in python_files(os.path.join(ROOT, "glm"))
        for module in imported_modules(path)
        if module in root_modules
    }
    assert not found


def test_the_root_holds_short_entry_scripts_and_the_task_helpers():
    for name in sorted(os.listdir(ROOT)):
        if not name.endswith(".py") or name in ROOT_HELPERS:
            continue
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            text = f.read()
        assert 'if __name__ == "__main__":' in text, f"{name} is not an entry script"
        assert text.count("\n") < 250, f"{name} is {text.count(chr(10))} lines: move library code into glm/"


FINETUNE_SCORE_AND_EVALUATE = """
import json, os, sys
import glm
assert glm.__file__.startswith(os.environ["PYTHONPATH"]), glm.__file__  # the installed copy, not a checkout
import paddle
from paddlenlp.trainer import TrainingArguments
from glm import GLMForConditionalGeneration, GLMForMultipleChoice
from glm.inputs import MultipleChoiceBuilder
from glm.loading import load_model_and_tokenizer
from glm.tokenization import special_token_ids
from glm.training.arguments import ModelArguments, parse_arguments
from glm.training.task import finish
from glm.understanding.cloze import ClozeDataArguments, finetune_cloze
from glm.understanding.language_model import lm_examples, lm_metrics, score_targets
from glm.understanding.multiple_choice import build_choice_examples, choice_metrics, read_choice_rows, score_examples

argv = ["recipe.json", "--model_name_or_path", "model", "--dataset_name_or_path", "data", "--output_dir", "out"]
arguments = parse_arguments((ModelArguments, ClozeDataArguments, TrainingArguments), argv, default_argv=argv[:1])
trainer = finish(finetune_cloze(*arguments))

model, tokenizer = load_model_and_tokenizer("out", model_class=GLMForMultipleChoice)
rows = read_choice_rows("data/dev.json")
examples = build_choice_examples(rows, MultipleChoiceBuilder(tokenizer, 48), "dev.json")
scores = score_examples(model, examples, 4, special_token_ids(tokenizer).pad)
accuracy = choice_metrics(scores, [row["label"] for row in rows])["accuracy"]

model, tokenizer = load_model_and_tokenizer("out", model_class=GLMForConditionalGeneration)
windows = lm_examples(tokenizer, [row["inputs_pretokenized"] for row in rows], seq_length=32, overlapping_eval=8)
lm = lm_metrics(score_targets(model, windows, 4, special_token_ids(tokenizer).pad))
print(json.dumps({"steps": trainer.state.global_step, "accuracy": accuracy, "trained_accuracy":
                  json.load(open("out/eval_results.json"))["eval_accuracy"], "lm": lm}))
"""


def test_the_installed_package_finetunes_scores_and_evaluates_outside_the_checkout(installed_package, micro_model,
                                                                                   tmp_path):
    work = tmp_path / "elsewhere"
    shutil.copytree(micro_model, work / "model")
    (work / "data").mkdir()
    for split, count in (("train", 32), ("dev", 8)):
        with open(os.path.join(ROOT, "demo_data", "cloze", f"{split}.json"), encoding="utf-8") as f:
            (work / "data" / f"{split}.json").write_text("".join(f.readlines()[:count]), encoding="utf-8")
    recipe = {"src_length": 48, "max_steps": 3, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
              "learning_rate": 3e-3, "logging_steps": 1, "save_steps": 2, "seed": 7, "disable_tqdm": True,
              "report_to": "none", "device": "cpu"}  # fmt: skip
    (work / "recipe.json").write_text(json.dumps(recipe))

    result = run_outside_checkout(FINETUNE_SCORE_AND_EVALUATE, work, installed_package)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3
    assert summary["accuracy"] == summary["trained_accuracy"]  # the saved model scores as the run evaluated it
    assert summary["lm"]["tokens"] > 0 and 1 < summary["lm"]["perplexity"] < 2 * 576  # vocab 576: near uniform
    assert (work / "out" / "checkpoint-2").is_dir() and (work / "out" / "model_state.pdparams").exists()
    assert set(TOKENIZER_FILES) <= set(os.listdir(work / "out"))


def test_the_installed_package_ships_the_servers_page(installed_package):
    """server.py's page is package data: `pip install .` must carry it (pyproject's package-data)."""
    page = installed_package / "glm" / "serving" / "static" / "index.html"
    assert page.is_file() and "/fill" in page.read_text(encoding="utf-8")


def test_the_package_requires_what_it_runs_on_and_the_test_tools_only_as_an_extra(installed_package):
    """`pip install .` installs the requirements, not pytest, openai or selenium (`.[test]` adds them)."""
    [metadata] = [path / "METADATA" for path in installed_package.glob("glm_paddle-*.dist-info")]
    requires = [line.split(":", 1)[1].strip() for line in metadata.read_text().splitlines() if line.startswith("Requires-Dist:")]
    runtime = [line for line in requires if "extra ==" not in line]
    test = [line for line in requires if 'extra == "test"' in line]
    assert any(line.startswith("paddlepaddle==") for line in runtime) and any(line.startswith("fastapi") for line in runtime)
    for tool in ("pytest", "openai", "selenium"):
        assert not any(line.startswith(tool) for line in runtime), runtime
        assert any(line.startswith(tool) for line in test), test

"""First contact: the commands a new user types, the console they read, the loss curve, the installed package."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
from conftest import ROOT, run_outside_checkout

import finetune_generation
import predict_generation
from glm.training import console
from glm.training.curve import CURVE_FILE, evaluation_axis_label, plot_training_curve

TINY_DEFAULT_MODEL = os.path.join(ROOT, "configs", "glm-tiny-chinese")
QUICK = ["--max_eval_samples", "4", "--report_to", "none"]  # step caps come with each command


def script(*args, cwd=ROOT, env=None, input=None):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
        timeout=600, input=input,
    )


def png_size(path):
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def default_job(tmp_path_factory):
    """`python finetune_generation.py --output_dir X`, capped at 6 steps and 8 dev rows; stderr a file."""
    output = tmp_path_factory.mktemp("default-job") / "out"
    result = script(
        os.path.join(ROOT, "finetune_generation.py"), "--output_dir", str(output), "--max_steps", "6",
        "--logging_steps", "2", "--max_eval_samples", "8", "--report_to", "none",
        cwd=str(output.parent),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stderr


def test_default_job_console(default_job):
    output, stderr = default_job
    lines = stderr.splitlines()
    assert "OMP_NUM_THREADS" not in stderr
    assert "DEBUG" not in stderr and "Training Configuration Arguments" not in stderr  # the argument dump
    assert "to the vocabulary" not in stderr and "evaluation_strategy reset" not in stderr
    assert "\x1b[" not in stderr  # no colour codes, no cursor-up of nested bars, when stderr is a file
    header = [line for line in lines if re.match(r"(recipe|model|data|train|output) {2,}", line)]
    assert [line.split()[0] for line in header] == ["recipe", "model", "data", "train", "output"]
    assert header[0] == "recipe   " + os.path.join(ROOT, "configs", "tiny-default.json") + " (the embedded default) + " + (
        f"--output_dir {output} --max_steps 6 --logging_steps 2 --max_eval_samples 8 --report_to none"
    )
    assert "random init" in header[1] and "8 dev rows" in header[2] and header[3].startswith("train    6 steps of 32")
    heading = next(i for i, line in enumerate(lines) if line.split() == ["ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU-4", "eval", "loss"])
    untrained, trained = lines[heading + 1].split(), lines[heading + 2].split()
    assert untrained[0] == "untrained" and trained[0] == "trained" and len(untrained) == len(trained) == 6
    eval_results = json.loads((output / "eval_results.json").read_text())
    assert float(trained[5]) == pytest.approx(eval_results["eval_loss"], abs=0.006)  # the table shows the files' numbers
    assert float(trained[3]) == pytest.approx(eval_results["eval_rougeL"], abs=0.006)
    assert re.fullmatch(r"Done in \d+:\d\d\.", lines[-9])
    assert lines[-8:] == [
        f"Files in out{os.sep}",  # relative to where it ran
        "  model       config.json, model_state.pdparams",
        "  tokenizer   added_tokens.json, cog-pretrain.model, special_tokens_map.json, tokenizer_config.json",
        "  settings    generation_settings.json",
        "  predictions eval_predictions.jsonl, untrained_predictions.jsonl",
        "  scores      eval_results.json, train_results.json, untrained_results.json",
        f"  loss curve  {CURVE_FILE}",
        "  run record  run_record.json, trainer_state.json",
    ]


def test_default_job_draws_the_loss_curve(default_job):
    output, _ = default_job
    width, height = png_size(output / CURVE_FILE)
    assert (width, height) == (1200, 450)  # two panels: loss + learning rate, and untrained -> trained scores
    assert os.path.getsize(output / CURVE_FILE) > 20_000
    assert not [name for name in os.listdir(output) if name.startswith(".tmp-")]


def test_decoding_is_said_in_words():
    from glm.generation_settings import GenerationArguments, strategy_in_brief

    assert strategy_in_brief(GenerationArguments(num_beams=1)) == "beam search, 1 beam"
    assert strategy_in_brief(GenerationArguments(num_beams=5)) == "beam search, 5 beams"
    assert strategy_in_brief(GenerationArguments(decode_strategy="greedy_search")) == "greedy search"


def test_the_evaluation_panel_says_loss_over_losses():
    assert evaluation_axis_label(["loss_token", "loss_sentence", "loss_document"]) == "loss"  # pretraining
    assert evaluation_axis_label(["accuracy"]) == evaluation_axis_label(["rougeL", "bleu4"]) == "score"


def test_curve_without_evaluations_has_one_panel_and_needs_training(tmp_path):
    history = [{"step": s, "loss": 5.0 / s, "learning_rate": 1e-3 * (1 - s / 10)} for s in range(1, 10)]
    assert plot_training_curve(history + [{"step": 9, "eval_loss": 0.7, "eval_accuracy": 0.5}], str(tmp_path / "a.png"))
    assert png_size(tmp_path / "a.png") == (700, 450)  # a single evaluation is a point on the loss panel
    assert plot_training_curve([{"step": 3, "train_loss": 1.0}], str(tmp_path / "b.png"))  # shorter than logging_steps
    assert not plot_training_curve([{"step": 0, "eval_loss": 1.0}], str(tmp_path / "c.png"))  # no training
    assert not (tmp_path / "c.png").exists()


def test_results_table_follows_the_task_metrics():
    rows = {"untrained": {"accuracy": 25.0, "loss": 1.3863}, "trained": {"accuracy": 81.256, "loss": 0.5}}
    assert console.results_table(rows) == [
        "            accuracy       loss",
        "untrained      25.00       1.39",
        "trained        81.26       0.50",
    ]
    assert console.model_metrics({"eval_loss": 1.0, "eval_runtime": 3.0, "epoch": 1.0}, "eval") == {"loss": 1.0}


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], (40, 48, 3, "glm-tiny-chinese")),  # the embedded default
        (["--max_steps", "30"], (40, 48, 3, "glm-tiny-chinese")),  # any flag keeps it
        (["--lora", "true", "--output_dir", "x"], (40, 48, 3, "glm-tiny-chinese")),
        (["--model_name_or_path", "THUDM/glm-large-chinese", "--output_dir", "x"], (608, 160, 5, "glm-large-chinese")),
        ([os.path.join(ROOT, "configs", "glm-large-chinese.json"), "--src_length", "512"], (512, 160, 5, "glm-large-chinese")),
    ],
)
def test_one_coherent_default(flags, expected):
    model_args, data_args, generation_args, training_args = finetune_generation.parse_generation_arguments(flags)
    got = (data_args.src_length, data_args.tgt_length, generation_args.num_beams, model_args.model_name_or_path)
    assert got[:3] == expected[:3] and got[3].endswith(expected[3])


def test_a_resumed_training_bar_counts_only_the_steps_this_process_trains(capsys):
    """It starts at the checkpoint's step (PaddleNLP's jumped there at the first step, so its rate and time
    left counted the resumed steps as just done) and shows its rate in s/step throughout."""
    from paddlenlp.trainer import TrainerControl, TrainerState

    progress = console.ConsoleProgress()
    state = TrainerState(global_step=40, max_steps=50)
    progress.on_train_begin(None, state, TrainerControl())
    assert (progress.training_bar.n, progress.training_bar.initial) == (40, 40)
    state.global_step = 41
    progress.on_step_end(None, state, TrainerControl())
    assert progress.training_bar.n == 41
    progress.training_bar.refresh()
    progress.training_bar.close()
    assert "41/50" in capsys.readouterr().err
    assert "s/step" in str(progress.training_bar) and "step/s" not in str(progress.training_bar)


def test_a_named_model_without_a_recipe_takes_its_settings_or_fits_the_lengths(tmp_path, capsys):
    # A checkpoint this toolkit wrote: the lengths and decoding it was trained with (generation_settings.json).
    finetuned = tmp_path / "finetuned"
    shutil.copytree(TINY_DEFAULT_MODEL, finetuned)
    (finetuned / "generation_settings.json").write_text(json.dumps({"src_length": 40, "tgt_length": 48, "num_beams": 3}))
    parse = finetune_generation.parse_generation_arguments
    parsed = parse(["--model_name_or_path", str(finetuned), "--num_beams", "2", "--output_dir", "x"])
    assert (parsed[1].src_length, parsed[1].tgt_length, parsed[2].num_beams) == (40, 48, 2)  # a flag given wins
    assert "generation_settings.json (the lengths and decoding the model was trained with)" in capsys.readouterr().err
    # Without one, THUDM's lengths come down to the model's maximum, with a note; a length given stays.
    parsed = parse(["--model_name_or_path", TINY_DEFAULT_MODEL, "--output_dir", "x"])
    assert (parsed[1].src_length, parsed[1].tgt_length) == (256, 160)
    assert "with src_length 608 → 256 (the model's max_sequence_length)" in capsys.readouterr().err
    # The built-in min_tgt_length 55 comes down to a shorter --tgt_length given.
    parsed = parse(["--model_name_or_path", TINY_DEFAULT_MODEL, "--tgt_length", "32", "--output_dir", "x"])
    assert (parsed[1].tgt_length, parsed[2].min_tgt_length) == (32, 32)
    assert "min_tgt_length 55 → 32 (tgt_length)" in capsys.readouterr().err
    result = script("finetune_generation.py", "--model_name_or_path", TINY_DEFAULT_MODEL, "--src_length", "300",
                    "--output_dir", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "error: --src_length 300 exceeds the model's max_sequence_length 256: pass --src_length 256 or less, or the "
        "recipe configs/tiny-default.json"
    )
    assert not (tmp_path / "out").exists()  # a refused run leaves no empty --output_dir


def test_do_eval_false_also_skips_a_recipes_evaluation_before_training():
    parse = finetune_generation.parse_generation_arguments
    assert parse([])[1].eval_before_training  # the embedded default's recipe asks for it
    assert not parse(["--do_eval", "false"])[1].eval_before_training
    assert parse(["--do_eval", "false", "--eval_before_training", "true"])[1].eval_before_training


def test_lora_on_the_embedded_default_takes_the_readme_path(tmp_path):
    # On the untrained default --lora would adapt random weights no later run can rebuild: refused, with
    # the way out. The README's path (finetune the default, then LoRA on its checkpoint) runs.
    refused = script("finetune_generation.py", "--lora", "true", "--output_dir", str(tmp_path / "refused"), *QUICK)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "holds no weights" in refused.stderr.splitlines()[-1] and "finetune it first" in refused.stderr

    base, adapter = tmp_path / "base", tmp_path / "lora"
    trained = script("finetune_generation.py", "--output_dir", str(base), "--max_steps", "2",
                     "--eval_before_training", "false", "--do_eval", "false", *QUICK)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = script("finetune_generation.py", "configs/tiny-default.json", "--model_name_or_path", str(base),
                    "--lora", "true", "--output_dir", str(adapter), "--max_steps", "2",
                    "--eval_before_training", "false", *QUICK)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (adapter / "lora_config.json").exists() and (adapter / CURVE_FILE).exists()
    assert "LoRA rank 8" in result.stderr


def test_data_parallel_launch_of_the_embedded_default(tmp_path):
    result = script(
        "-m", "paddle.distributed.launch", "--nproc_per_node", "2", os.path.join(ROOT, "finetune_generation.py"),
        "--max_steps", "2", "--output_dir", str(tmp_path / "out"), "--eval_before_training", "false", *QUICK,
        cwd=str(tmp_path),
    )  # fmt: skip
    worker0 = (tmp_path / "log" / "workerlog.0").read_text(errors="replace")  # launch writes log/ where it runs
    assert result.returncode == 0, (result.stderr + worker0)[-3000:]
    assert "2 processes on cpu" in worker0 and (tmp_path / "out" / "eval_results.json").exists()


def test_predict_help_says_where_defaults_come_from(capsys):
    with pytest.raises(SystemExit) as exit:
        predict_generation.parse_arguments(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert exit.value.code == 0
    assert "take their values from the checkpoint's generation_settings.json" in help_text
    assert "(default: None)" not in help_text and "(default: checkpoints/glm-tiny-chinese, the embedded default" in help_text


def test_training_help_shows_the_values_that_apply_and_this_toolkits_flags_first(capsys):
    with pytest.raises(SystemExit) as exit:
        finetune_generation.parse_generation_arguments(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    help_text = " ".join(out.split())
    assert len(out.splitlines()) < 300  # PaddleNLP's whole TrainingArguments made it 594 lines
    assert out.startswith("usage: ") and "[RECIPE.json] [--flag value ...]" in out.splitlines()[0]
    headings = [line for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings == ["options:", "ModelArguments:", "DataArguments:", "GenerationArguments:",
                        "TrainingArguments (PaddleNLP's):", "ConsoleArguments:"]
    # The embedded default's value beside the built-in one, where they differ.
    assert "(tiny-default.json: 0.003; built-in: 5e-05)" in help_text  # --learning_rate
    assert "(tiny-default.json: 40; built-in: 608)" in help_text  # --src_length
    # PaddleNLP's flags no run here sets are named, still accepted, and described by --help_all.
    assert "--help_all describes each" in help_text and "--pipeline_parallel_degree" in help_text
    assert "--pipeline_parallel_degree PIPELINE_PARALLEL_DEGREE" not in out
    with pytest.raises(SystemExit):
        finetune_generation.parse_generation_arguments(["--help_all"])
    assert "--pipeline_parallel_degree PIPELINE_PARALLEL_DEGREE" in capsys.readouterr().out


def test_predict_logs_its_settings_in_one_line(default_job):
    output, _ = default_job
    result = script("predict_generation.py", "--model_name_or_path", str(output), "--num_beams", "2", input="类型#裙*颜色#红色\n")
    assert result.returncode == 0, result.stderr[-3000:]
    settings = [line for line in result.stderr.splitlines() if line.startswith("settings ")]
    assert settings == [
        "settings src_length 40, tgt_length 48, beam search, 2 beams, length_penalty 0.7 (thudm), min_tgt_length 10, "
        f"no_repeat_ngram_size 3 (flags given, then {output / 'generation_settings.json'})"
    ]
    assert "OMP_NUM_THREADS" not in result.stderr and "to the vocabulary" not in result.stderr


def readme_python_snippet():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## Using the model from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_installed_package_runs_the_readme_snippet(default_job, installed_package, tmp_path):
    assert (installed_package / "glm" / "modeling.py").exists()
    elsewhere = tmp_path / "elsewhere"  # not the checkout: only the installed package can be imported
    shutil.copytree(default_job[0], elsewhere / "checkpoints" / "glm-tiny-chinese")
    result = run_outside_checkout(readme_python_snippet(), elsewhere, installed_package)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OMP_NUM_THREADS" not in result.stderr
    printed = result.stdout.strip().splitlines()
    assert printed and all(line.strip() for line in printed)  # one answer per prompt, as the README says


def test_log_level_flags():
    from paddlenlp.utils.log import logger

    from glm.cli import console

    try:
        console.configure_logging(["--output_dir", "x", "--log_level", "debug"])
        assert logger.logger.level == 10  # the argument dump is a DEBUG record
        console.configure_logging(["--log_level_replica", "debug"])  # rank 0: the main process's level
        assert logger.logger.level == 30
        with pytest.raises(console.UserError, match="--log_level/--log_level_replica must be one of"):
            console.configure_logging(["--log_level", "loud"])
    finally:
        console.configure_logging([])

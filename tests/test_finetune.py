"""finetune_generation.py: every flag changes behaviour, distributed, the default job, bad input (resume and
reruns: test_reruns.py, test_faults.py)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
from conftest import ROOT
from paddlenlp.transformers import AutoTokenizer

import finetune_generation
import glm.generation
from glm import GLMConfig, GLMForConditionalGeneration

TOKENIZER_FILES = ("cog-pretrain.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory):
    """A 2-layer, hidden-32 GLM directory with the tiny default's tokenizer and no weights."""
    path = tmp_path_factory.mktemp("micro-glm")
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(ROOT, "configs", "glm-tiny-chinese", name), path)
    GLMConfig(
        num_layers=2, vocab_size=576, hidden_size=32, num_attention_heads=4, max_sequence_length=128,
        embedding_dropout_prob=0.1, attention_dropout_prob=0.1, output_dropout_prob=0.1,
    ).save_pretrained(str(path))  # fmt: skip
    return str(path)


@pytest.fixture(scope="session")
def micro_weights_model(micro_model, tmp_path_factory):
    """The micro GLM with random weights saved: a base LoRA can be trained on (and verified against)."""
    path = tmp_path_factory.mktemp("micro-glm-weights")
    shutil.copytree(micro_model, path, dirs_exist_ok=True)
    paddle.seed(11)
    GLMForConditionalGeneration(GLMConfig.from_pretrained(micro_model)).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory):
    """48 training and 6 dev rows of the demo data."""
    path = tmp_path_factory.mktemp("micro-data")
    for split, count in (("train", 48), ("dev", 6)):
        with open(os.path.join(ROOT, "demo_data", f"{split}.json"), encoding="utf-8") as f:
            lines = f.readlines()[:count]
        (path / f"{split}.json").write_text("".join(lines), encoding="utf-8")
    return str(path)


def run(micro_model, micro_data, output_dir, *flags, callbacks=()):
    argv = [
        "--model_name_or_path", micro_model, "--dataset_name_or_path", micro_data, "--output_dir", str(output_dir),
        "--src_length", "40", "--tgt_length", "16", "--min_tgt_length", "0", "--num_beams", "2",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--learning_rate", "3e-3",
        "--warmup_steps", "0", "--logging_steps", "1", "--save_steps", "1000", "--seed", "7",
        "--disable_tqdm", "true", "--report_to", "none", "--device", "cpu", *flags,
    ]  # fmt: skip
    # Fresh parameter names, as in a new process: optimizer checkpoints are keyed by them.
    with paddle.utils.unique_name.guard():
        return finetune_generation.main(argv, callbacks=callbacks)


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_label_smoothing_reaches_the_loss(micro_model, micro_data, tmp_path):
    flags = ("--do_train", "--max_steps", "12", "--learning_rate", "1e-2")
    plain = run(micro_model, micro_data, tmp_path / "a", *flags, "--label_smoothing", "0")
    smoothed = run(micro_model, micro_data, tmp_path / "b", *flags, "--label_smoothing", "0.3")
    # Once the model has learnt something its cross-entropy falls below the uniform term
    # mean_vocab(-log p), so the smoothed loss must sit clearly above the plain one.
    assert logged(plain, "loss")[-1] < logged(plain, "loss")[0] - 0.5
    assert logged(smoothed, "loss")[-1] > logged(plain, "loss")[-1] + 0.1
    assert smoothed.model.config.label_smoothing == 0.3


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_decay_ratio_ends_the_schedule_at_lr_times_ratio(micro_model, micro_data, tmp_path, schedule):
    trainer = run(
        micro_model, micro_data, tmp_path, "--do_train", "--max_steps", "4", "--lr_scheduler_type", schedule,
        "--lr_decay_ratio", "0.25", "--learning_rate", "0.002",
    )  # fmt: skip
    rates = logged(trainer, "learning_rate")
    assert rates[-1] == pytest.approx(0.002 * 0.25, rel=1e-4)
    assert rates[0] > rates[-1]


def test_generation_flags_drive_evaluation_decoding(micro_model, micro_data, tmp_path, monkeypatch):
    seen = []
    real_generate = glm.generation.GLMGenerator.generate
    monkeypatch.setattr(
        glm.generation.GLMGenerator, "generate", lambda self, sources, config: seen.append((sources, config)) or real_generate(self, sources, config)
    )  # fmt: skip
    trainer = run(
        micro_model, micro_data, tmp_path, "--do_eval", "--min_tgt_length", "5", "--length_penalty", "1.3",
        "--no_repeat_ngram_size", "2", "--num_beams", "3", "--select_topk", "false", "--length_penalty_form", "gnmt",
    )  # fmt: skip
    config = seen[0][1]
    assert (config.min_tgt_length, config.length_penalty, config.no_repeat_ngram_size, config.num_beams) == (5, 1.3, 2, 3)
    assert (config.select_topk, config.length_penalty_form, config.tgt_length) == (False, "gnmt", 16)
    # evaluation decoded the dev sources exactly as training builds them: the source side of each example
    dev_sources = [s for sources, _ in seen for s in sources]
    train_side = [f["input_ids"][: f["attention_mask"]] for f in trainer.eval_dataset]
    assert sorted(dev_sources) == sorted(train_side)
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_bleu4", "eval_loss"} <= set(results)
    predictions = [json.loads(line) for line in (tmp_path / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and all({"content", "summary", "prediction"} <= set(p) for p in predictions)


def test_recompute_trains_identically(micro_model, micro_data, tmp_path):
    plain = run(micro_model, micro_data, tmp_path / "a", "--do_train", "--max_steps", "2")
    recomputed = run(micro_model, micro_data, tmp_path / "b", "--do_train", "--max_steps", "2", "--recompute", "true")
    assert recomputed.model.glm.transformer.enable_recompute and not plain.model.glm.transformer.enable_recompute
    np.testing.assert_allclose(logged(recomputed, "loss"), logged(plain, "loss"), rtol=1e-5)


def test_fp16_on_cpu_warns_and_trains_in_float32(micro_model, micro_data, tmp_path, caplog):
    trainer = run(micro_model, micro_data, tmp_path, "--do_train", "--max_steps", "1", "--fp16", "--fp16_opt_level", "O2")
    assert "fp16/bf16 need a GPU" in caplog.text
    assert not trainer.args.fp16 and trainer.model.glm.word_embeddings.weight.dtype == paddle.float32


def test_lora_flags_and_only_adapters_saved(micro_weights_model, micro_data, tmp_path):
    run(
        micro_weights_model, micro_data, tmp_path, "--do_train", "--max_steps", "2", "--lora", "true", "--lora_rank", "4",
        "--lora_alpha", "8", "--lora_target_modules", ".*query_key_value.*", ".*mlp.*",
    )  # fmt: skip
    config = json.loads((tmp_path / "lora_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert any("dense_h_to_4h" in p for p in config["target_modules"])
    assert not any("attention\\.dense" in p for p in config["target_modules"])
    assert (tmp_path / "lora_model_state.pdparams").exists() and not (tmp_path / "model_state.pdparams").exists()
    saved = paddle.load(str(tmp_path / "lora_model_state.pdparams"))
    assert saved and all("lora_" in name for name in saved)
    fingerprint = json.loads((tmp_path / "base_fingerprint.json").read_text())
    assert fingerprint["config"]["hidden_size"] == 32 and len(fingerprint["weights_sha256"]) == 64


def test_lora_on_a_base_without_weights_is_refused(micro_model, micro_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(micro_model, micro_data, tmp_path, "--do_train", "--max_steps", "2", "--lora", "true")
    assert exit_info.value.code == 2
    assert "holds no weights" in capsys.readouterr().err and not (tmp_path / "lora_config.json").exists()


def test_save_total_limit_keeps_the_newest_checkpoints(micro_model, micro_data, tmp_path):
    run(micro_model, micro_data, tmp_path, "--do_train", "--max_steps", "4", "--save_steps", "1", "--save_total_limit", "2")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model_name_or_path", "/nonexistent/model"], "/nonexistent/model: no such model directory"),
        (["--dataset_name_or_path", "/nonexistent/data"], "/nonexistent/data: no such dataset directory"),
        (["--no_such_flag", "1"], "unknown flag --no_such_flag (--help lists the flags)"),
        (["--src_length", "500"], "--src_length 500 exceeds the model's max_sequence_length 128"),
        (["--num_beams", "2", "--num_return_sequences", "3"], "num_return_sequences cannot exceed num_beams"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(micro_model, micro_data, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run(micro_model, micro_data, tmp_path, "--do_train", "--max_steps", "1", *flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_bad_data_and_mismatched_tokenizer(micro_model, micro_data, tmp_path, capsys):
    bad_data = tmp_path / "bad"
    shutil.copytree(micro_data, bad_data)
    with open(bad_data / "train.json", "a", encoding="utf-8") as f:
        f.write('{"content": "类型#裙", "summary": 3}\n')
    small_vocab = tmp_path / "small"
    shutil.copytree(micro_model, small_vocab)
    GLMConfig.from_pretrained(micro_model, vocab_size=512).save_pretrained(str(small_vocab))
    for flags, message in (
        (["--dataset_name_or_path", str(bad_data)], "train.json:49: 'summary' must be a string, got int"),
        (["--model_name_or_path", str(small_vocab)], "the tokenizer has 576 tokens but the model's embeddings only 512"),
    ):
        with pytest.raises(SystemExit):
            run(micro_model, micro_data, tmp_path / "out", "--do_train", "--max_steps", "1", *flags)
        assert message in capsys.readouterr().err


def cli(*args, cwd=ROOT, timeout=600, input=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, input=input
    )


def test_cli_bad_path_has_no_traceback(tmp_path):
    result = cli("finetune_generation.py", "--model_name_or_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: no such model directory " + (
        "(or give one of PaddleNLP's names: THUDM/glm-515m, THUDM/glm-2b, THUDM/glm-10b, THUDM/glm-large-chinese, "
        "THUDM/glm-10b-chinese)"
    )
    assert "Traceback" not in result.stderr


def test_default_recipe_runs_end_to_end_step_capped(tmp_path):
    result = cli(
        "finetune_generation.py", os.path.join(ROOT, "configs", "tiny-default.json"), "--output_dir", str(tmp_path),
        "--max_steps", "3", "--max_eval_samples", "8", "--eval_before_training", "false", "--disable_tqdm", "true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    model = GLMForConditionalGeneration.from_pretrained(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tokenizer) <= model.config.vocab_size
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_bleu4", "eval_loss"} <= set(results)
    assert len((tmp_path / "eval_predictions.jsonl").read_text().splitlines()) == 8
    settings = json.loads((tmp_path / "generation_settings.json").read_text())
    assert settings["src_length"] == 40 and settings["num_beams"] == 3


def test_data_parallel_on_two_cpu_processes(micro_model, micro_data, tmp_path):
    result = cli(
        "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "log"),
        "finetune_generation.py", "--model_name_or_path", micro_model, "--dataset_name_or_path", micro_data,
        "--output_dir", str(tmp_path / "out"), "--src_length", "40", "--tgt_length", "16", "--min_tgt_length", "0",
        "--num_beams", "2", "--per_device_train_batch_size", "4", "--max_steps", "2", "--do_train", "--do_eval",
        "--disable_tqdm", "true", "--report_to", "none", "--device", "cpu",
    )  # fmt: skip
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "log").glob("*"))
    assert result.returncode == 0, (result.stderr + logs)[-4000:]
    assert (tmp_path / "out" / "model_state.pdparams").exists()
    assert len((tmp_path / "out" / "eval_predictions.jsonl").read_text().splitlines()) == 6  # both ranks' shares
    worker_logs = sorted(p.name for p in (tmp_path / "log").glob("workerlog.*"))
    assert worker_logs == ["workerlog.0", "workerlog.1"]
    assert "2 processes on cpu" in logs  # the console header of rank 0


@pytest.mark.parametrize(  # the pretraining recipes: tests/test_pretrain_glm.py
    "recipe", sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".json") and "pretrain" not in n)
)
def test_shipped_recipes_parse(recipe):
    model_args, data_args, generation_args, training_args = finetune_generation.parse_generation_arguments(
        [os.path.join(ROOT, "configs", recipe), "--output_dir", "unused"]
    )
    assert training_args.do_train and training_args.do_eval
    generation_args.config(data_args.tgt_length)  # valid decoding settings
    if "lora" in recipe:
        assert model_args.lora

"""--prefix_tuning (P-tuning v2) as users run it: only the prefix trains and is saved (folded) with its base's
fingerprint; the saved prefix loads to the model the run ended with; a resumed run ends as the whole run;
predict, evaluate and the cloze and pretraining tasks take it; a prefix on another base is refused."""

import concurrent.futures
import hashlib
import json
import os

import httpx

import numpy as np
import paddle
import pytest
from test_finetune import micro_data, micro_model, micro_weights_model, run  # noqa: F401  (fixtures)
from test_reruns import StopAtSave, stopped

import evaluate
import finetune_cloze
from glm.generation import GenerationConfig, GLMGenerator
from glm.loading import load_model_and_tokenizer
from glm.prefix import GLMPrefixModel, load_prefix
from glm.tokenization import special_token_ids

PREFIX = ("--prefix_tuning", "true", "--num_prefix_tokens", "4", "--learning_rate", "3e-2")


def prefix_weights(directory):
    return paddle.load(os.path.join(directory, "prefix_model_state.pdparams"), return_numpy=True)


def base_sha(path):
    return {n: hashlib.sha256(open(os.path.join(path, n), "rb").read()).hexdigest() for n in os.listdir(path)
            if n.endswith(".pdparams")}


@pytest.fixture(scope="module")
def projected(micro_weights_model, micro_data, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("projected")
    before = base_sha(micro_weights_model)
    trainer = run(micro_weights_model, micro_data, output, "--do_train", "--do_eval", "--max_steps", "6",
                  "--save_steps", "3", *PREFIX, "--prefix_projection", "true")
    assert base_sha(micro_weights_model) == before  # the base's weight files are byte-identical
    return output, trainer


def test_only_the_prefix_trains_and_is_saved_folded_with_its_base(projected, micro_weights_model):  # noqa: F811
    output, trainer = projected
    model = trainer.model
    assert isinstance(model, GLMPrefixModel)
    trained = [name for name, p in model.named_parameters() if not p.stop_gradient]
    assert trained and all(name.startswith("prefix_encoder.") for name in trained)
    # the base in memory is the base on disk: no weight moved
    base = paddle.load(os.path.join(micro_weights_model, "model_state.pdparams"), return_numpy=True)
    for name, value in model.model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), base[name], err_msg=name)
    # the final prefix is folded: no MLP, one [tokens, layers * 2 * hidden] table; checkpoints keep the MLP
    config = json.loads((output / "prefix_config.json").read_text())
    assert config["prefix_projection"] is False and config["num_prefix_tokens"] == 4
    assert {k: v.shape for k, v in prefix_weights(output).items()} == {"0.weight": (4, 2 * 2 * 32)}
    assert len(prefix_weights(output / "checkpoint-3")) > 1  # embedding and both MLP layers
    assert not (output / "model_state.pdparams").exists() and not (output / "pre_caches.npy").exists()
    assert json.loads((output / "base_fingerprint.json").read_text())["weights_sha256"]


def test_the_saved_prefix_loads_to_the_model_the_run_ended_with(projected, micro_weights_model):  # noqa: F811
    output, trainer = projected
    loaded, tokenizer = load_model_and_tokenizer(micro_weights_model, prefix_path=str(output))
    ids = special_token_ids(tokenizer)
    sources = [[ids.cls, 30, 31, 32, ids.gmask, ids.eos], [ids.cls, 40, ids.gmask, ids.eos]]
    config = GenerationConfig(num_beams=2, tgt_length=6, num_return_sequences=2)
    in_process = GLMGenerator(trainer.model, ids).generate(sources, config)
    assert GLMGenerator(loaded, ids).generate(sources, config) == in_process
    mine = trainer.model.layer_caches(1)
    for (k1, v1), (k2, v2) in zip(mine, loaded.layer_caches(1)):
        np.testing.assert_array_equal(k1.numpy(), k2.numpy())
        np.testing.assert_array_equal(v1.numpy(), v2.numpy())
    base, _ = load_model_and_tokenizer(micro_weights_model)
    assert GLMGenerator(base, ids).generate(sources, GenerationConfig(num_beams=2, tgt_length=6, num_return_sequences=2)) != in_process


def test_a_resumed_prefix_run_ends_as_the_whole_run(micro_weights_model, micro_data, tmp_path, capsys):  # noqa: F811
    flags = ("--do_train", "--max_steps", "8", "--save_steps", "4", *PREFIX, "--prefix_projection", "true")
    run(micro_weights_model, micro_data, tmp_path / "whole", *flags)
    stopped(capsys, micro_weights_model, micro_data, tmp_path / "cut", *flags, callbacks=[StopAtSave(4)])
    trainer = run(micro_weights_model, micro_data, tmp_path / "cut", *flags)
    assert "resuming" in capsys.readouterr().err and trainer.state.global_step == 8
    whole, cut = prefix_weights(tmp_path / "whole"), prefix_weights(tmp_path / "cut")
    np.testing.assert_array_equal(whole["0.weight"], cut["0.weight"])
    assert json.loads((tmp_path / "cut" / "train_results.json").read_text())["train_loss"] == pytest.approx(
        json.loads((tmp_path / "whole" / "train_results.json").read_text())["train_loss"], rel=1e-5)


def test_a_finished_prefix_run_evaluates_again_from_its_folded_prefix(projected, micro_weights_model, micro_data):  # noqa: F811
    output, trainer = projected
    before = json.loads((output / "eval_results.json").read_text())
    again = run(micro_weights_model, micro_data, output, "--do_train", "--do_eval", "--max_steps", "6",
                "--save_steps", "3", *PREFIX, "--prefix_projection", "true")
    assert again.state.global_step == 6
    after = json.loads((output / "eval_results.json").read_text())
    assert (after["eval_rougeL"], after["eval_loss"]) == (before["eval_rougeL"], before["eval_loss"])


def test_a_prefix_on_another_base_or_with_lora_is_refused(projected, micro_model, micro_weights_model, micro_data, tmp_path, capsys):  # noqa: F811
    output, _ = projected
    (tmp_path / "lm.txt").write_text("这款连衣裙很好看\n", encoding="utf-8")
    argv = ["--task", "lm", "--data_file", str(tmp_path / "lm.txt"), "--prefix_path", str(output)]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv + ["--model_name_or_path", micro_model])  # same shapes, random init: another base
    assert exit_info.value.code == 2
    assert "trained on another base" in capsys.readouterr().err
    assert evaluate.main(argv + ["--model_name_or_path", micro_model, "--force", "true"])["perplexity"] > 0
    with pytest.raises(SystemExit):
        evaluate.main(argv + ["--model_name_or_path", micro_weights_model, "--lora_path", str(output)])
    assert "give one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(micro_model, micro_data, tmp_path / "x", "--do_train", "--max_steps", "2", *PREFIX)
    assert "holds no weights" in capsys.readouterr().err


def test_prefix_lm_scores_equal_the_prefixed_models_own_loss(projected, micro_weights_model, tmp_path):  # noqa: F811
    output, _ = projected
    (tmp_path / "lm.txt").write_text("这款连衣裙很好看，显瘦百搭\n简约的上衣\n", encoding="utf-8")
    argv = ["--task", "lm", "--data_file", str(tmp_path / "lm.txt"), "--model_name_or_path", micro_weights_model]
    with_prefix = evaluate.main(argv + ["--prefix_path", str(output)])
    without = evaluate.main(argv)
    assert with_prefix["tokens"] == without["tokens"] and with_prefix["loss"] != pytest.approx(without["loss"])


def test_cloze_prefix_tuning_and_multiple_choice_evaluation(micro_weights_model, tmp_path):  # noqa: F811
    from conftest import ROOT

    data = os.path.join(ROOT, "demo_data", "cloze")
    argv = ["--model_name_or_path", micro_weights_model, "--dataset_name_or_path", data, "--output_dir", str(tmp_path),
            "--src_length", "48", "--max_steps", "4", "--max_eval_samples", "16", "--per_device_train_batch_size", "8",
            "--evaluation_strategy", "no", "--save_strategy", "no", "--eval_before_training", "false",
            "--disable_tqdm", "true", "--report_to", "none", "--device", "cpu", *PREFIX]
    with paddle.utils.unique_name.guard():
        trainer = finetune_cloze.main(argv)
    assert isinstance(trainer.model, GLMPrefixModel)
    trained_accuracy = json.loads((tmp_path / "eval_results.json").read_text())["eval_accuracy"]
    rows = tmp_path / "dev16.json"
    with open(os.path.join(data, "dev.json"), encoding="utf-8") as f:
        rows.write_text("".join(f.readlines()[:16]), encoding="utf-8")
    results = evaluate.main(["--model_name_or_path", micro_weights_model, "--prefix_path", str(tmp_path),
                             "--data_file", str(rows), "--src_length", "48"])
    assert results["accuracy"] == trained_accuracy


def test_continued_pretraining_with_a_prefix_learns_and_predict_takes_it(micro_weights_model, tmp_path):  # noqa: F811
    from test_pretrain_glm import corpora as _corpora  # noqa: F401
    from test_pretrain_glm import TINY, run as pretrain

    from glm.pretraining.corpus import prepare_corpus
    from glm.tokenization import load_tokenizer
    from conftest import ROOT

    tokenizer = load_tokenizer(TINY)
    corpora = {}
    for split, count in (("train", 120), ("dev", 20)):
        with open(os.path.join(ROOT, "demo_data", f"{split}.json"), encoding="utf-8") as f:
            (tmp_path / f"{split}.jsonl").write_text("".join(f.readlines()[:count]), encoding="utf-8")
        prepare_corpus([str(tmp_path / f"{split}.jsonl")], str(tmp_path / split), tokenizer, text_key="summary")
        corpora[split] = str(tmp_path / split)
    trainer = pretrain(micro_weights_model, corpora, tmp_path / "out", "--do_train", "--do_eval", "--max_steps", "12",
                       "--eval_before_training", "true", "--save_steps", "1000", *PREFIX, "--learning_rate", "0.1")
    assert isinstance(trainer.model, GLMPrefixModel)
    untrained = json.loads((tmp_path / "out" / "untrained_results.json").read_text())["untrained_loss"]
    trained = json.loads((tmp_path / "out" / "eval_results.json").read_text())["eval_loss"]
    assert trained < untrained - 0.01  # the prefix alone lowered the held-out loss (of a random base: a little)
    assert (tmp_path / "out" / "prefix_config.json").exists() and not (tmp_path / "out" / "model_state.pdparams").exists()


def test_the_server_answers_with_the_prefix_as_predict_and_evaluate_do(projected, micro_weights_model, tmp_path):  # noqa: F811
    import predict_generation
    from test_serving import Served

    output, _ = projected
    prompts = ["类型#裙*颜色#红色", "这款[MASK]的裙子，[sMASK]"]
    (tmp_path / "p.json").write_text("".join(json.dumps({"src": p}, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    predict_generation.main(["--model_name_or_path", micro_weights_model, "--prefix_path", str(output), "--data_file",
                             str(tmp_path / "p.json"), "--output_file", str(tmp_path / "out.jsonl"), "--src_length", "40",
                             "--tgt_length", "12", "--num_beams", "2", "--min_tgt_length", "2"])  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    row = {"inputs_pretokenized": "这款百搭[MASK]，长裙款式灵动飘逸。", "choices_pretokenized": ["上衣", "裙", "裤子"], "label": 1}
    (tmp_path / "mc.json").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    evaluate.main(["--model_name_or_path", micro_weights_model, "--prefix_path", str(output), "--data_file",
                   str(tmp_path / "mc.json"), "--output_file", str(tmp_path / "r.json")])  # fmt: skip
    scored = json.loads((tmp_path / "r.predictions.jsonl").read_text(encoding="utf-8"))
    server = Served(micro_weights_model, prefix_path=str(output))
    try:
        for prompt, expected in zip(prompts, rows):
            got = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 12}).json()
            assert got["choices"][0]["text"] == (expected.get("filled") or expected["prediction"])
        got = server.post("/score", {"context": row["inputs_pretokenized"], "choices": row["choices_pretokenized"]}).json()
        assert [round(s, 6) for s in got["scores"]] == scored["scores"]
    finally:
        server.stop()
    # The base and the prefix as two served models (server.py --prefixes ads=DIR), requested side by side.
    predict_generation.main(["--model_name_or_path", micro_weights_model, "--data_file", str(tmp_path / "p.json"),
                             "--output_file", str(tmp_path / "base.jsonl"), "--src_length", "40", "--tgt_length", "12",
                             "--num_beams", "2", "--min_tgt_length", "2"])  # fmt: skip
    base_rows = [json.loads(line) for line in (tmp_path / "base.jsonl").read_text(encoding="utf-8").splitlines()]
    server = Served(micro_weights_model, prefixes={"ads": load_prefix(load_model_and_tokenizer(micro_weights_model)[0],
                                                                      str(output), micro_weights_model)})
    try:
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["micro", "ads"]
        work = [(model, prompt) for model in ("ads", "micro") for prompt in prompts]
        with concurrent.futures.ThreadPoolExecutor(len(work)) as pool:
            answers = list(pool.map(lambda w: server.post("/v1/completions", {"model": w[0], "prompt": w[1], "max_tokens": 12}).json(), work))
        for (model, _), answer, expected in zip(work, answers, rows + base_rows):
            assert answer["model"] == model
            assert answer["choices"][0]["text"] == (expected.get("filled") or expected["prediction"])
        got = server.post("/score", {"model": "ads", "context": row["inputs_pretokenized"], "choices": row["choices_pretokenized"]}).json()
        assert [round(s, 6) for s in got["scores"]] == scored["scores"]
        assert server.post("/fill", {"model": "other", "text": "x[MASK]"}).status_code == 404
    finally:
        server.stop()

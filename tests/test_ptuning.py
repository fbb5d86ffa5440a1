"""THUDM's P-tuning for cloze (glm/ptuning.py, finetune_cloze.py --ptuning): the prompt tokens go where the
placement says, their embeddings are the encoder's output (oracle: the same model with real tokens there),
only the prompt trains under --freeze_backbone, and what is saved scores as the run did."""

import hashlib
import json
import os

import numpy as np
import paddle
import pytest
from conftest import ROOT
from test_finetune import micro_model, micro_weights_model  # noqa: F401  (fixtures)
from test_reruns import StopAtSave

import evaluate
import finetune_cloze
from glm import GLMConfig, GLMForMultipleChoice
from glm.inputs import MultipleChoiceBuilder, collate_multiple_choice
from glm.ptuning import PROMPT_ENCODERS, PromptConfig, PromptSpell, PromptTunedModel, prompt_parameters
from glm.tokenization import load_tokenizer

DATA = os.path.join(ROOT, "demo_data", "cloze")
TOKENIZER = load_tokenizer(os.path.join(ROOT, "configs", "glm-tiny-chinese"))


@pytest.mark.parametrize("placement, at_start", [("start", 3), ("blank", 0), ("split", 2)])
def test_prompt_tokens_go_where_the_placement_says(placement, at_start):
    plain = MultipleChoiceBuilder(TOKENIZER, 48).build("这款百搭[MASK]，长裙款式", ["裙", "裤"])
    example = MultipleChoiceBuilder(TOKENIZER, 48, prompt_tokens=3, prompt_placement=placement).build("这款百搭[MASK]，长裙款式", ["裙", "裤"])
    blank = plain.input_ids.index(TOKENIZER.convert_tokens_to_ids("[MASK]"))
    assert len(example.input_ids) == len(plain.input_ids) + 3 and len(example.prompt_positions) == 3
    expected = list(range(1, 1 + at_start)) + list(range(blank + at_start, blank + 3))
    assert example.prompt_positions == expected
    # the rest is the plain row's, shifted; the blank's block positions follow it
    rest = [t for i, t in enumerate(example.input_ids) if i not in example.prompt_positions]
    assert rest == plain.input_ids
    assert example.position_ids[0][example.choice_indices[0][0]] == blank + 3
    # a long context is cut so that the row with its prompt still fits src_length
    long = MultipleChoiceBuilder(TOKENIZER, 16, prompt_tokens=3, prompt_placement=placement).build("长" * 40 + "[MASK]", ["裙"])
    assert long.context_length == 16 and long.context_truncated


@pytest.mark.parametrize("encoder", PROMPT_ENCODERS)
def test_prompt_spell_gives_one_vector_per_token_and_its_parameter_count(encoder):
    spell = PromptSpell(5, 16, encoder)
    assert spell().shape == [5, 16]
    assert sum(int(p.numel()) for p in spell.parameters()) == prompt_parameters(5, 16, encoder)


def test_prompt_embeddings_equal_real_tokens_at_those_positions():
    """Oracle: with encoder `none` and its vectors set to the word embeddings of real tokens, the scores equal
    the plain model's on rows holding those tokens at the prompt positions."""
    paddle.seed(3)
    head = GLMForMultipleChoice(GLMConfig(num_layers=2, vocab_size=576, hidden_size=32, num_attention_heads=4,
                                          max_sequence_length=64, embedding_dropout_prob=0, attention_dropout_prob=0,
                                          output_dropout_prob=0))  # fmt: skip
    head.eval()
    tuned = PromptTunedModel(head, PromptConfig(4, "none", "split", 32, True))
    tuned.eval()
    real = [40, 41, 42, 43]
    tuned.spell.spell_embeddings.weight.set_value(paddle.gather(head.glm.word_embeddings.weight, paddle.to_tensor(real)))
    builder = MultipleChoiceBuilder(TOKENIZER, 40, prompt_tokens=4)
    examples = [builder.build("这款百搭[MASK]，长裙款式", ["裙", "裤子", "鞋"]), builder.build("简约的[MASK]", ["上衣", "包"])]
    batch = collate_multiple_choice([e.features() for e in examples], pad_id=0)
    inputs = {k: paddle.to_tensor(v) for k, v in batch.items()}
    scores = tuned(**inputs, return_dict=False)[0].numpy()
    ids = batch["input_ids"].copy()
    for row, example in enumerate(examples):
        ids[row, example.prompt_positions] = real
    plain_inputs = dict(inputs, input_ids=paddle.to_tensor(ids))
    plain_inputs.pop("prompt_positions")
    expected = head(**plain_inputs, return_dict=False)[0].numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    placeholders = head(**{k: v for k, v in inputs.items() if k != "prompt_positions"}, return_dict=False)[0].numpy()
    assert np.abs(np.nan_to_num(placeholders - scores)).max() > 1e-2  # the prompt is what changed them (-inf: no choice)


def run(model, output, *flags, callbacks=()):
    argv = ["--model_name_or_path", model, "--dataset_name_or_path", DATA, "--output_dir", str(output),
            "--src_length", "48", "--max_steps", "6", "--save_steps", "3", "--save_strategy", "steps",
            "--max_eval_samples", "24", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
            "--evaluation_strategy", "no", "--eval_before_training", "false", "--learning_rate", "1e-2", "--seed", "5",
            "--disable_tqdm", "true", "--report_to", "none", "--device", "cpu", "--ptuning", "true",
            "--num_prompt_tokens", "4", *flags]  # fmt: skip
    with paddle.utils.unique_name.guard():
        return finetune_cloze.main(argv, callbacks=callbacks)


def weight_files(path):
    return {n: hashlib.sha256(open(os.path.join(path, n), "rb").read()).hexdigest() for n in os.listdir(path) if n.endswith(".pdparams")}


@pytest.fixture(scope="module")
def frozen(micro_weights_model, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("frozen-prompt")
    before = weight_files(micro_weights_model)
    trainer = run(micro_weights_model, output, "--freeze_backbone", "true", "--prompt_encoder", "lstm")
    assert weight_files(micro_weights_model) == before
    return output, trainer


def test_a_frozen_backbone_trains_and_saves_only_the_prompt(frozen, micro_weights_model):  # noqa: F811
    output, trainer = frozen
    assert isinstance(trainer.model, PromptTunedModel)
    trained = [name for name, p in trainer.model.named_parameters() if not p.stop_gradient]
    assert trained and all(name.startswith("spell.") for name in trained)
    base = paddle.load(os.path.join(micro_weights_model, "model_state.pdparams"), return_numpy=True)
    for name, value in trainer.model.model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), base[name], err_msg=name)
    assert sorted(weight_files(output)) == ["prompt_model_state.pdparams"]
    assert json.loads((output / "prompt_config.json").read_text())["prompt_encoder"] == "lstm"
    assert (output / "base_fingerprint.json").exists()
    assert sorted(weight_files(output / "checkpoint-3")) == ["prompt_model_state.pdparams", "scheduler.pdparams"]  # no base copy


def test_the_saved_prompt_scores_as_the_run_did_and_only_on_its_base(frozen, micro_model, micro_weights_model, tmp_path, capsys):  # noqa: F811
    output, _ = frozen
    rows = tmp_path / "dev.json"
    with open(os.path.join(DATA, "dev.json"), encoding="utf-8") as f:
        rows.write_text("".join(f.readlines()[:24]), encoding="utf-8")
    argv = ["--model_name_or_path", micro_weights_model, "--prompt_path", str(output), "--data_file", str(rows),
            "--src_length", "48", "--output_file", str(tmp_path / "r.json")]
    evaluate.main(argv)
    ran = [json.loads(line)["scores"] for line in (output / "eval_predictions.jsonl").read_text().splitlines()]
    loaded = [json.loads(line)["scores"] for line in (tmp_path / "r.predictions.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(loaded, ran, rtol=1e-5)
    without = evaluate.main(argv[:2] + argv[4:])
    assert json.loads((tmp_path / "r.predictions.jsonl").read_text().splitlines()[0])["scores"] != ran[0]
    assert without["rows"] == 24
    with pytest.raises(SystemExit):
        evaluate.main(["--model_name_or_path", micro_model] + argv[2:])
    assert "trained on another base" in capsys.readouterr().err


def test_a_resumed_prompt_run_ends_as_the_whole_run(micro_weights_model, tmp_path, capsys):  # noqa: F811
    flags = ("--freeze_backbone", "true", "--prompt_encoder", "mlp")
    run(micro_weights_model, tmp_path / "whole", *flags)
    with pytest.raises(SystemExit) as exit_info:
        run(micro_weights_model, tmp_path / "cut", *flags, callbacks=[StopAtSave(3)])
    assert exit_info.value.code == 130
    trainer = run(micro_weights_model, tmp_path / "cut", *flags)
    assert trainer.state.global_step == 6
    whole = paddle.load(str(tmp_path / "whole" / "prompt_model_state.pdparams"), return_numpy=True)
    cut = paddle.load(str(tmp_path / "cut" / "prompt_model_state.pdparams"), return_numpy=True)
    for name in whole:
        np.testing.assert_array_equal(whole[name], cut[name], err_msg=name)


def test_a_trained_backbone_is_its_own_model_with_the_prompt_beside_it(micro_model, tmp_path):  # noqa: F811
    trainer = run(micro_model, tmp_path, "--prompt_encoder", "none")
    assert (tmp_path / "model_state.pdparams").exists() and (tmp_path / "prompt_config.json").exists()
    accuracy = json.loads((tmp_path / "eval_results.json").read_text())["eval_accuracy"]
    rows = tmp_path / "dev.json"
    with open(os.path.join(DATA, "dev.json"), encoding="utf-8") as f:
        rows.write_text("".join(f.readlines()[:24]), encoding="utf-8")
    # evaluate finds the prompt in the model directory by itself
    assert evaluate.main(["--model_name_or_path", str(tmp_path), "--data_file", str(rows), "--src_length", "48"])["accuracy"] == accuracy
    assert trainer.model.spell.encoder == "none"
    # the server's /score applies the checkpoint's prompt by itself, as evaluate does (server.py's served_prompt)
    import server
    from test_serving import Served

    from glm.prediction import CheckpointArguments

    evaluate.main(["--model_name_or_path", str(tmp_path), "--data_file", str(rows), "--src_length", "48",
                   "--output_file", str(tmp_path / "r.json")])
    first = json.loads((tmp_path / "r.predictions.jsonl").read_text(encoding="utf-8").splitlines()[0])
    row = json.loads(rows.read_text(encoding="utf-8").splitlines()[0])
    served = Served(str(tmp_path), prompt=lambda p: server.served_prompt(None, str(tmp_path), p, CheckpointArguments()))
    try:
        got = served.post("/score", {"context": row["inputs_pretokenized"], "choices": row["choices_pretokenized"]}).json()
    finally:
        served.stop()
    assert [round(s, 6) for s in got["scores"]] == first["scores"]


def test_bad_ptuning_flags_are_one_line_errors(micro_model, micro_weights_model, tmp_path, capsys):  # noqa: F811
    for flags, message in (
        (["--prompt_encoder", "gru"], "--prompt_encoder must be one of lstm, mlp, none; got gru"),
        (["--prompt_placement", "end"], "--prompt_placement must be one of split, start, blank; got end"),
        (["--num_prompt_tokens", "0"], "--num_prompt_tokens"),
        (["--num_prompt_tokens", "47"], "cannot hold --num_prompt_tokens 47"),
        (["--prefix_tuning", "true"], "choose one way to adapt the model"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run(micro_weights_model, tmp_path / "x", *flags)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        run(micro_model, tmp_path / "y", "--freeze_backbone", "true")
    assert "holds no weights" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

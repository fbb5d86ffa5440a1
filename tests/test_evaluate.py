"""evaluate.py against slow direct computations: a full forward per window (lm) or per line (lambada)
with a NumPy log-softmax and the obvious loops, and per-choice sequences (multiple_choice)."""

import json
import os
import shutil

import numpy as np
import paddle
import pytest
from conftest import ROOT, tiny_config_kwargs

import evaluate
from glm import GLMConfig, GLMForConditionalGeneration
from glm.tokenization import encode_text, load_tokenizer, special_token_ids
from glm.understanding.language_model import lm_windows

TOKENIZER_DIR = os.path.join(ROOT, "configs", "glm-tiny-chinese")
TOKENIZER_FILES = ("cog-pretrain.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
LINES = [  # documents of 4 to 40 tokens: one window, and several
    "这款百搭上衣",
    "这款街头风的上衣，真丝材质质感细腻，一抹粉色格外亮眼，碎花元素很有看点，长袖设计方便活动，秋季穿搭正合适。",
    "主打简约风的裤，牛仔布材质舒适耐用，条纹图案时髦吸睛。",
    "一款优雅风格的裙，包臀版型穿着利落，棉材质质感细腻，墨绿色配色干净耐看，翻领衬托颈部线条，夏季穿搭正合适。",
]


def save_model(path, model):
    os.makedirs(path, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(TOKENIZER_DIR, name), path)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    paddle.seed(3)
    model = GLMForConditionalGeneration(GLMConfig(**tiny_config_kwargs(vocab_size=576, max_sequence_length=64)))
    return save_model(tmp_path_factory.mktemp("eval-glm"), model)


@pytest.fixture(scope="module")
def loaded(model_dir):
    model = GLMForConditionalGeneration.from_pretrained(model_dir)
    model.eval()
    return model, load_tokenizer(model_dir)


def run(*flags):
    with paddle.utils.unique_name.guard():
        return evaluate.main(list(flags))


def full_log_probs(model, input_ids, sep, mask_position):
    """One full forward of one sequence with the sep mask; NumPy log-softmax of every position."""
    length = len(input_ids)
    position_ids = [[min(i, mask_position) if i >= sep else i for i in range(length)],
                    [max(0, i - sep + 1) for i in range(length)]]  # fmt: skip
    logits = model(paddle.to_tensor([input_ids]), paddle.to_tensor([position_ids]), paddle.to_tensor([sep]),
                   return_dict=True).logits.numpy()[0].astype("float64")  # fmt: skip
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def slow_lm(model, tokenizer, lines, seq_length, overlap, unidirectional):
    """Every window of every line in its own forward; each token scored in the first window whose text holds it."""
    ids = special_token_ids(tokenizer)
    window, overlap = seq_length - 1, overlap or seq_length - 1
    total, count = 0.0, 0
    for line in lines:
        tokens = tokenizer(line, add_special_tokens=False)["input_ids"]
        scored_until, start, index = 1, 0, 0  # tokens[0] is only ever a prompt
        while True:
            chunk = tokens[start : start + window]
            prompt_length = 1 if index == 0 or unidirectional else window - overlap
            prompt, text = chunk[:prompt_length], chunk[prompt_length:]
            source = [ids.cls] + prompt + [ids.mask]
            if text:
                log_probs = full_log_probs(model, source + [ids.sop] + text[:-1], len(source), len(source) - 1)
                for j, token in enumerate(text):
                    if start + prompt_length + j >= scored_until:
                        total -= log_probs[len(source) + j, token]
                        count += 1
                scored_until = max(scored_until, start + len(chunk))
            if start + window >= len(tokens):
                break
            start, index = start + overlap, index + 1
    return total / count, count


@pytest.mark.parametrize("seq_length,overlap,unidirectional", [(64, None, False), (12, None, False), (12, 4, False), (12, 4, True)])
def test_lm_perplexity_equals_a_full_forward_per_window(loaded, model_dir, tmp_path, seq_length, overlap, unidirectional):
    model, tokenizer = loaded
    data = tmp_path / "text.txt"
    data.write_text("\n".join(LINES) + "\n\n", encoding="utf-8")
    flags = ["--task", "lm", "--model_name_or_path", model_dir, "--data_file", str(data), "--seq_length", str(seq_length),
             "--batch_size", "3", "--output_file", str(tmp_path / "out.json")]  # fmt: skip
    flags += ["--overlapping_eval", str(overlap)] if overlap else []
    flags += ["--unidirectional", "true"] if unidirectional else []
    results = run(*flags)
    loss, count = slow_lm(model, tokenizer, LINES, seq_length, overlap, unidirectional)
    assert results["tokens"] == count
    assert results["loss"] == pytest.approx(loss, rel=1e-5)
    assert results["perplexity"] == pytest.approx(np.exp(loss), rel=1e-5)
    assert json.loads((tmp_path / "out.json").read_text()) == results
    if not unidirectional:  # every token but each document's first is scored once
        assert count == sum(len(tokenizer(line, add_special_tokens=False)["input_ids"]) - 1 for line in LINES)


def test_lm_windows_follow_thudm():
    tokens = list(range(20))
    windows = list(lm_windows(tokens, seq_length=8, overlapping_eval=3))
    assert windows[0] == ([0], list(range(1, 7)), 0)  # first: one prompt token, the rest of the window scored
    assert windows[1] == ([3, 4, 5, 6], [7, 8, 9], 0)  # later: len - overlap prompt tokens, bidirectional
    assert [x for _, text, skip in windows for x in text[skip:]] == tokens[1:]
    unidirectional = list(lm_windows(tokens, seq_length=8, overlapping_eval=3, unidirectional=True))
    assert unidirectional[1] == ([3], [4, 5, 6, 7, 8, 9], 3)  # one prompt token; only the last 3 scored


def make_predict_this_token(model, token):
    """Every position's argmax becomes `token`: the final LayerNorm outputs its (enlarged) embedding row."""
    stack, embeddings = model.glm.transformer, model.glm.word_embeddings.weight
    row = embeddings.numpy()
    row[token] *= 50
    embeddings.set_value(row)
    stack.final_layernorm.weight.set_value(np.zeros_like(stack.final_layernorm.weight.numpy()))
    stack.final_layernorm.bias.set_value(row[token])


def test_lambada_accuracy_equals_slow_teacher_forced_check(loaded, tmp_path):
    _, tokenizer = loaded
    paddle.seed(4)
    model = GLMForConditionalGeneration(GLMConfig(**tiny_config_kwargs(vocab_size=576, max_sequence_length=64)))
    # Answers are tokenized as the line continues in pretraining: no sentencepiece "▁" before them.
    single = encode_text(tokenizer, "裤", continuation=True)
    assert len(single) == 1  # a one-token answer the doctored model always predicts
    make_predict_this_token(model, single[0])
    model_dir = save_model(tmp_path / "model", model)
    lines = ["上衣 百搭 裤", "真丝 材质 质感 裤", "主打 简约 风 的 这款", "一款 优雅 风格 的 裙", "这款 材质"]
    data = tmp_path / "words.txt"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    results = run("--task", "lambada", "--model_name_or_path", model_dir, "--data_file", str(data),
                  "--batch_size", "2", "--output_file", str(tmp_path / "out.json"))  # fmt: skip

    ids = special_token_ids(tokenizer)
    model.eval()
    expected = []
    for line in lines:
        words = line.split()
        context = tokenizer("".join(words[:-1]), add_special_tokens=False)["input_ids"]
        answer = encode_text(tokenizer, words[-1], continuation=True)
        source = [ids.cls] + context + [ids.mask, ids.eos]
        log_probs = full_log_probs(model, source + [ids.sop] + answer[:-1], len(source), len(source) - 2)
        expected.append(all(log_probs[len(source) + j].argmax() == token for j, token in enumerate(answer)))
    assert expected == [True, True, False, False, False]
    assert results["accuracy"] == pytest.approx(40.0) and results["rows"] == 5
    rows = [json.loads(line) for line in (tmp_path / "out.predictions.jsonl").read_text().splitlines()]
    assert [row["correct"] for row in rows] == expected


def test_multiple_choice_accuracy_and_predictions(model_dir, tmp_path):
    rows = [
        {"inputs_pretokenized": "这款百搭[MASK]，长裙款式灵动飘逸。", "choices_pretokenized": ["上衣", "裙", "裤"], "label": 1},
        {"inputs_pretokenized": "经典马丁靴款式", "choices_pretokenized": ["鞋", "包"], "label": 0},
        {"inputs_pretokenized": "主打简约风的[MASK]", "choices_pretokenized": ["牛仔布材质", "包"], "label": 1},
    ]
    data = tmp_path / "dev.json"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    results = run("--task", "multiple_choice", "--model_name_or_path", model_dir, "--data_file", str(data),
                  "--batch_size", "2", "--output_file", str(tmp_path / "mc.json"))  # fmt: skip
    predictions = [json.loads(line) for line in (tmp_path / "mc.predictions.jsonl").read_text().splitlines()]
    assert [{k: p[k] for k in r} for p, r in zip(predictions, rows)] == rows  # input fields kept
    for p in predictions:
        assert len(p["scores"]) == len(p["choices_pretokenized"]) and p["prediction"] == int(np.argmax(p["scores"]))
    right = sum(p["prediction"] == p["label"] for p in predictions)
    assert results["accuracy"] == pytest.approx(100 * right / 3, abs=1e-3)
    with paddle.no_grad():  # the scores are the packed model's, proven against per-choice sequences elsewhere
        model = evaluate.GLMForMultipleChoice.from_pretrained(model_dir)
        model.eval()
        from glm.inputs import MultipleChoiceBuilder, collate_multiple_choice

        builder = MultipleChoiceBuilder(load_tokenizer(model_dir), 64)
        example = builder.build(rows[1]["inputs_pretokenized"], rows[1]["choices_pretokenized"])
        batch = {k: paddle.to_tensor(v) for k, v in collate_multiple_choice([example.features()], builder.ids.pad).items()}
        np.testing.assert_allclose(model(**batch)[0].numpy()[0], predictions[1]["scores"], rtol=1e-5)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--task", "bleu"], "--task must be one of multiple_choice, lm, lambada"),
        (["--task", "lm"], "--data_file is required"),
        (["--task", "lm", "--data_file", "/nonexistent.txt"], "/nonexistent.txt: no such file"),
        (["--task", "lm", "--seq_length", "500"], "--seq_length 500 exceeds the model's max_sequence_length 64"),
        (["--task", "lm", "--seq_length", "10", "--overlapping_eval", "10"], "--overlapping_eval must be between 1 and 9 (seq_length - 1); got 10"),
        (["--task", "lm", "--src_length", "40"], "--src_length applies to --task multiple_choice, not to --task lm"),
        (["--task", "lambada", "--bad_lambada"], "needs a context and a last word"),
        (["--task", "lambada", "--empty_file"], "empty.txt: no lines to score (the file is empty)"),
        (["--task", "lambada", "--blank_file"], "blank.txt: no lines to score (the file holds only whitespace)"),
        (["--task", "lm", "--seq_length", "0"], "--seq_length must be between 3 and 64 (the model's max_sequence_length); got 0"),
        (["--task", "multiple_choice", "--src_length", "0", "--bad_choice"], "--src_length must be between 4 and 64 (the model's max_sequence_length); got 0"),
        (["--task", "multiple_choice", "--bad_choice"], "dev.json:2: 'label' must be a choice index 0..1, got 2"),
        (["--task", "lm", "--lora_path", "/tmp"], "/tmp: no lora_config.json"),
        # An adapter refusal (glm.lora.AdapterError) is one line here too, as in predict.
        (["--task", "lm", "--adapter_without_weights"], "no lora_model_state.pdparams (expected a LoRA adapter directory)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, capsys, flags, message):
    text = tmp_path / "text.txt"
    text.write_text("这款百搭上衣\n", encoding="utf-8")
    if "--bad_lambada" in flags:
        flags = flags[:-1] + ["--data_file", str(text)]
    for name, content in (("--empty_file", ""), ("--blank_file", " \n\t\n")):
        if name in flags:
            path = tmp_path / f"{name[2:7]}.txt"
            path.write_text(content, encoding="utf-8")
            flags = flags[:-1] + ["--data_file", str(path)]
    if "--adapter_without_weights" in flags:
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "lora_config.json").write_text("{}", encoding="utf-8")
        flags = flags[:-1] + ["--lora_path", str(tmp_path / "adapter")]
    if "--bad_choice" in flags:
        good = {"inputs_pretokenized": "这款[MASK]", "choices_pretokenized": ["鞋", "包"], "label": 0}
        (tmp_path / "dev.json").write_text(json.dumps(good) + "\n" + json.dumps(dict(good, label=2)) + "\n", encoding="utf-8")
        flags = flags[:-1] + ["--data_file", str(tmp_path / "dev.json")]
    if "--data_file" not in flags and flags != ["--task", "lm"]:
        flags = flags + ["--data_file", str(text)]
    if "--task" in flags and "bleu" not in flags:
        flags = flags + ["--model_name_or_path", model_dir]
    with pytest.raises(SystemExit) as exit_:
        run(*flags)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]



def test_an_adapter_is_verified_against_its_base_as_predict_verifies_it(model_dir, tmp_path, capsys):
    """evaluate.py loads through the one loader: an adapter recorded for another base of the same shape is
    refused in one line (it used to be applied silently), --force applies it, the right base takes it."""
    from glm.files import write_json_atomic
    from glm.lora import BASE_FINGERPRINT, apply_lora, base_fingerprint

    base = GLMForConditionalGeneration.from_pretrained(model_dir)
    paddle.seed(5)
    adapter = apply_lora(base, rank=4, alpha=8, target_modules=[".*query_key_value.*"])
    for name, param in adapter.named_parameters():
        if "lora_B" in name:  # a trained adapter: lora_B starts at zero
            param.set_value(paddle.randn(param.shape) * 0.5)
    adapter.save_pretrained(str(tmp_path / "adapter"))
    write_json_atomic(str(tmp_path / "adapter" / BASE_FINGERPRINT), base_fingerprint(model_dir, base.config))
    twin = tmp_path / "twin"  # same shapes, other weights
    shutil.copytree(model_dir, twin)
    state = paddle.load(str(twin / "model_state.pdparams"))
    paddle.save({name: value + 0.01 for name, value in state.items()}, str(twin / "model_state.pdparams"))
    text = tmp_path / "text.txt"
    text.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    flags = ["--task", "lm", "--data_file", str(text), "--lora_path", str(tmp_path / "adapter")]

    with pytest.raises(SystemExit) as exit_:
        run(*flags, "--model_name_or_path", str(twin))
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: adapter ") and "was trained on another base than" in last and "--force" in last
    forced = run(*flags, "--model_name_or_path", str(twin), "--force", "true")
    adapted = run(*flags, "--model_name_or_path", model_dir)
    plain = run("--task", "lm", "--data_file", str(text), "--model_name_or_path", model_dir)
    assert forced["tokens"] == adapted["tokens"] == plain["tokens"] > 0
    assert adapted["perplexity"] != pytest.approx(plain["perplexity"], rel=1e-3)  # the adapter was applied

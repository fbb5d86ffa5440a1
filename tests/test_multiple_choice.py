"""GLMForMultipleChoice and the packed multiple-choice inputs against their oracles: each choice scored
in its own sequence by GLMForConditionalGeneration (a full forward, a NumPy log-softmax), and PaddleNLP's
GLMForMultipleChoice on identical weights and inputs."""

import os

import numpy as np
import paddle
import pytest
from conftest import ROOT, tiny_config_kwargs
from paddlenlp.transformers import GLMConfig as PaddleNLPGLMConfig
from paddlenlp.transformers import GLMForMultipleChoice as PaddleNLPMultipleChoice

from glm import GLMConfig, GLMForConditionalGeneration, GLMForMultipleChoice
from glm.inputs import MultipleChoiceBuilder, collate_multiple_choice
from glm.lora import apply_lora
from glm.tokenization import load_tokenizer

ROWS = [  # (context, choices, label): several-token choices, a context without a blank, 2 to 5 choices
    ("这款百搭[MASK]，直筒剪裁修饰身形，长裙款式灵动飘逸。", ["上衣", "裙", "裤", "鞋", "包"], 1),
    ("主打简约风的[MASK]，牛仔布材质舒适耐用", ["牛仔布材质舒适耐用", "包"], 0),
    ("经典马丁靴款式，粗跟设计走路稳当", ["鞋", "上衣修身", "包"], 0),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(os.path.join(ROOT, "configs", "glm-tiny-chinese"))


@pytest.fixture(scope="module")
def models():
    """Our multiple-choice and generation models and PaddleNLP's multiple-choice model, same weights."""
    kwargs = tiny_config_kwargs(vocab_size=576)
    paddle.seed(11)
    ours = GLMForMultipleChoice(GLMConfig(**kwargs))
    generation = GLMForConditionalGeneration(GLMConfig(**kwargs))
    theirs = PaddleNLPMultipleChoice(PaddleNLPGLMConfig(**kwargs))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict()) == sorted(generation.state_dict())
    generation.set_state_dict(ours.state_dict())
    theirs.set_state_dict(ours.state_dict())
    for model in (ours, generation, theirs):
        model.eval()
    return ours, generation, theirs


def batch_of(builder, rows):
    batch = collate_multiple_choice([builder.build(*row).features() for row in rows], builder.ids.pad)
    return {name: paddle.to_tensor(value) for name, value in batch.items()}


def log_softmax(logits):
    logits = np.asarray(logits, dtype="float64")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def separate_sequence_scores(model, builder, context, choices):
    """Each choice in its own sequence `[CLS] context [MASK] <|endoftext|> <|startofpiece|> choice[:-1]`
    with the sep mask, a full forward, summed log-probabilities of its tokens."""
    source, mask_position, _, _ = builder.context_ids(context)
    scores = []
    for choice in choices:
        tokens = builder.glm.tokenize(choice, continuation=True)  # as the builder tokenizes a choice
        input_ids = source + [builder.ids.sop] + tokens[:-1]
        position_ids = [list(range(len(source))) + [mask_position] * len(tokens),
                        [0] * len(source) + list(range(1, len(tokens) + 1))]  # fmt: skip
        logits = model(
            paddle.to_tensor([input_ids]), paddle.to_tensor([position_ids]), paddle.to_tensor([len(source)]),
            return_dict=True,
        ).logits.numpy()[0]
        log_probs = log_softmax(logits[len(source) :])
        scores.append(sum(log_probs[i, token] for i, token in enumerate(tokens)))
    return scores


def test_packed_scores_equal_each_choice_in_its_own_sequence(models, tokenizer):
    ours, generation, _ = models
    builder = MultipleChoiceBuilder(tokenizer, src_length=48)
    batch = batch_of(builder, ROWS)
    scores = ours(**batch, return_dict=True).logits.numpy()
    assert scores.shape == [3, 5] or scores.shape == (3, 5)
    for row, (context, choices, _) in enumerate(ROWS):
        expected = separate_sequence_scores(generation, builder, context, choices)
        np.testing.assert_allclose(scores[row, : len(choices)], expected, rtol=1e-5, atol=1e-5)
        assert np.all(np.isneginf(scores[row, len(choices) :]))  # absent choices never win


def test_scores_equal_paddlenlp_multiple_choice_on_the_same_inputs(models, tokenizer):
    ours, _, theirs = models
    builder = MultipleChoiceBuilder(tokenizer, src_length=48)
    rows = [(context, choices[:2], 0) for context, choices, _ in ROWS]  # PaddleNLP needs equal choice counts
    examples = [builder.build(*row) for row in rows]
    batch = collate_multiple_choice([e.features() for e in examples], builder.ids.pad)
    inputs = [paddle.to_tensor(batch[name]) for name in ("input_ids", "position_ids", "attention_mask")]
    # PaddleNLP's form: per example, lists of per-choice tensors; ours takes it too.
    choice_ids = [[paddle.to_tensor(c) for c in e.choice_ids] for e in examples]
    choice_indices = [[paddle.to_tensor(c) for c in e.choice_indices] for e in examples]
    labels = paddle.to_tensor([0, 1, 0])
    our_loss, our_scores = ours(*inputs, choice_ids, choice_indices, labels=labels, return_dict=False)
    their = theirs(*inputs, choice_ids, choice_indices, labels=labels, return_dict=True)
    np.testing.assert_allclose(our_scores.numpy(), their.logits.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(our_loss), float(their.loss), rtol=1e-5)
    padded = ours(*inputs, paddle.to_tensor(batch["choice_ids"]), paddle.to_tensor(batch["choice_indices"]))[0]
    np.testing.assert_allclose(padded.numpy(), our_scores.numpy(), rtol=1e-6)


def test_loss_is_cross_entropy_over_scores_and_gradients_are_finite(models, tokenizer):
    ours, _, _ = models
    builder = MultipleChoiceBuilder(tokenizer, src_length=48)
    batch = batch_of(builder, ROWS)  # 5, 2 and 3 choices: padded with -inf
    loss, scores = ours(**batch, return_dict=False)
    scores = scores.numpy().astype("float64")
    expected = np.mean([-log_softmax(s[np.isfinite(s)])[label] for s, (_, _, label) in zip(scores, ROWS)])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    gradient = ours.glm.word_embeddings.weight.grad.numpy()
    assert np.isfinite(gradient).all() and np.abs(gradient).sum() > 0
    ours.clear_gradients()


def test_packed_layout_mask_and_positions(tokenizer):
    builder = MultipleChoiceBuilder(tokenizer, src_length=48)
    ids = builder.ids
    example = builder.build("经典马丁靴款式", ["鞋", "上衣修身"], 0)  # no blank: [MASK] appended
    context = example.context_length
    assert example.input_ids[0] == ids.cls and example.input_ids[context - 2 : context] == [ids.mask, ids.eos]
    first, second = example.choice_indices
    assert first == list(range(context, context + len(example.choice_ids[0])))
    assert second == list(range(first[-1] + 1, first[-1] + 1 + len(example.choice_ids[1])))
    assert example.input_ids[context] == ids.sop and example.input_ids[second[0]] == ids.sop
    assert example.input_ids[second[0] + 1 :] == example.choice_ids[1][:-1]
    assert example.position_ids[0][context:] == [context - 2] * (len(example.input_ids) - context)
    assert example.position_ids[1][second[0] :] == list(range(1, len(second) + 1))
    mask = collate_multiple_choice([example.features(), builder.build("短", ["鞋"]).features()], ids.pad)["attention_mask"]
    assert mask.shape == (2, 1, len(example.input_ids), len(example.input_ids))
    rows = mask[0, 0]
    assert rows[:, :context].all()  # everyone sees the context
    assert not rows[:context, context:].any()  # the context sees no block
    assert rows[second[-1], second[0] : second[-1] + 1].all() and not rows[second[0], second[0] + 1 :].any()  # causal
    assert not rows[second[0], first[0]] and not rows[first[0], second[0]]  # blocks never see each other


def test_long_context_keeps_its_blank(tokenizer):
    builder = MultipleChoiceBuilder(tokenizer, src_length=12)
    text = "一款优雅风格的" * 4 + "[MASK]" + "，包臀版型穿着利落" * 4
    input_ids, mask_position, truncated, _ = builder.context_ids(text)
    assert truncated and len(input_ids) == 12
    assert input_ids[mask_position] == builder.ids.mask and 3 <= mask_position <= 8  # a window around the blank
    with pytest.raises(ValueError, match="choice 1"):
        builder.build("这款[MASK]", ["鞋", ""])


def test_lora_wrapped_model_scores_and_trains(tokenizer):
    paddle.seed(5)
    model = apply_lora(GLMForMultipleChoice(GLMConfig(**tiny_config_kwargs(vocab_size=576))), rank=4,
                       target_modules=[".*query_key_value.*", ".*mlp.*"])
    builder = MultipleChoiceBuilder(tokenizer, src_length=48)
    batch = batch_of(builder, [ROWS[0], ROWS[2]])
    embeddings = model.glm.word_embeddings.weight.numpy().copy()
    optimizer = paddle.optimizer.AdamW(1e-2, parameters=[p for p in model.parameters() if not p.stop_gradient])
    losses = []
    for _ in range(20):
        loss = model(**batch, return_dict=True).loss
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.75 * losses[0], losses
    np.testing.assert_array_equal(model.glm.word_embeddings.weight.numpy(), embeddings)  # only adapters train

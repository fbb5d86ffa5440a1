"""The model against PaddleNLP's GLMForConditionalGeneration (an implementation nobody here wrote),
on identical random weights, and the properties PaddleNLP gets wrong."""

import numpy as np
import paddle
import pytest
from conftest import tiny_config_kwargs
from paddlenlp.transformers import GLMConfig as PaddleNLPGLMConfig
from paddlenlp.transformers import GLMForConditionalGeneration as PaddleNLPGLM

import glm.modeling
from glm import GLMConfig, GLMForConditionalGeneration
from glm.decoding_cache import DecodingCache, DecodingMask
from glm.lora import apply_lora

BATCH, LENGTH = 3, 12
SEPS = [4, 7, 12]  # the last row is all source: fully bidirectional


def glm_inputs(vocab_size, seed=0, seps=SEPS):
    """A batch laid out like GLM's blank infilling: bidirectional source before sep, causal after."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, vocab_size, [BATCH, LENGTH])
    positions, blocks = [], []
    for sep in seps:
        mask_pos = sep - 2
        positions.append([i if i < sep else mask_pos for i in range(LENGTH)])
        blocks.append([0 if i < sep else i - sep + 1 for i in range(LENGTH)])
    position_ids = np.stack([np.array(positions), np.array(blocks)], axis=1)
    keys, queries = np.arange(LENGTH)[None, None, :], np.arange(LENGTH)[None, :, None]
    mask_4d = ((keys < np.array(seps)[:, None, None]) | (keys <= queries))[:, None].astype("int64")
    loss_mask = (np.arange(LENGTH)[None, :] >= np.array(seps)[:, None] - 1).astype("float32")
    loss_mask[:, -1] = 0  # a padded tail position: not in the loss
    labels = rng.integers(0, vocab_size, [BATCH, LENGTH])
    as_tensor = paddle.to_tensor
    return dict(
        input_ids=as_tensor(input_ids),
        position_ids=as_tensor(position_ids),
        mask_4d=as_tensor(mask_4d),
        sep=as_tensor(np.array(seps)),
        labels=as_tensor(labels),
        loss_mask=as_tensor(loss_mask),
    )


def twin_models(**overrides):
    """Our model and PaddleNLP's holding the same random weights."""
    kwargs = tiny_config_kwargs(**overrides)
    paddle.seed(7)
    ours = GLMForConditionalGeneration(GLMConfig(**kwargs))
    theirs = PaddleNLPGLM(PaddleNLPGLMConfig(**kwargs))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    theirs.set_state_dict(ours.state_dict())
    ours.eval()
    theirs.eval()
    return ours, theirs


def relative_error(a, b):
    a, b = np.asarray(a, dtype="float64"), np.asarray(b, dtype="float64")
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def test_logits_match_paddlenlp_with_4d_mask():
    ours, theirs = twin_models()
    x = glm_inputs(ours.config.vocab_size)
    our_logits = ours(x["input_ids"], x["position_ids"], x["mask_4d"], return_dict=True).logits
    their_logits = theirs(x["input_ids"], x["position_ids"], x["mask_4d"], return_dict=True).logits
    assert our_logits.shape == [BATCH, LENGTH, ours.config.vocab_size]
    assert relative_error(our_logits.numpy(), their_logits.numpy()) < 1e-5


def test_sep_form_equals_4d_form_for_a_batch():
    # PaddleNLP's `attention_mask.dim == 1` never holds, so its sep form crashes for batch > 1.
    ours, _ = twin_models()
    x = glm_inputs(ours.config.vocab_size)
    by_sep = ours(x["input_ids"], x["position_ids"], x["sep"], return_dict=True).logits
    by_4d = ours(x["input_ids"], x["position_ids"], x["mask_4d"], return_dict=True).logits
    np.testing.assert_array_equal(by_sep.numpy(), by_4d.numpy())
    # and the mask matters: a fully causal mask (sep 0) gives different logits on the source
    causal = ours(x["input_ids"], x["position_ids"], paddle.zeros([BATCH], "int64"), return_dict=True).logits
    assert np.abs(causal.numpy()[0, :3] - by_sep.numpy()[0, :3]).max() > 1e-4


def test_loss_and_gradients_match_paddlenlp():
    # No label smoothing here: PaddleNLP's smoothing term has shape [B, L] against a flat [B*L] loss and
    # crashes when it is switched on (it never is in llm/glm). The smoothing test below is by hand.
    ours, theirs = twin_models()
    x = glm_inputs(ours.config.vocab_size)
    losses = []
    for model in (ours, theirs):
        loss = model(
            x["input_ids"], x["position_ids"], x["mask_4d"], labels=x["labels"], loss_mask=x["loss_mask"], return_dict=True
        ).loss
        loss.backward()
        losses.append(float(loss))
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[1])
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert relative_error(param.grad.numpy(), their_params[name].grad.numpy()) < 1e-4, name


def test_int_loss_mask_is_accepted_and_equals_float():
    # PaddleNLP's GLM crashes on an int64 loss_mask (float * int multiply).
    ours, _ = twin_models()
    x = glm_inputs(ours.config.vocab_size)
    as_float = ours(x["input_ids"], x["position_ids"], x["sep"], labels=x["labels"], loss_mask=x["loss_mask"])[0]
    as_int = ours(
        x["input_ids"], x["position_ids"], x["sep"], labels=x["labels"], loss_mask=x["loss_mask"].astype("int64")
    )[0]
    assert float(as_float) == pytest.approx(float(as_int), rel=1e-7)


def test_label_smoothing_matches_hand_computed_value():
    ours, _ = twin_models(label_smoothing=0.2)
    x = glm_inputs(ours.config.vocab_size)
    loss = float(ours(x["input_ids"], x["position_ids"], x["sep"], labels=x["labels"], loss_mask=x["loss_mask"])[0])
    logits = ours(x["input_ids"], x["position_ids"], x["sep"], return_dict=True).logits.numpy().astype("float64")
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    labels, weights = x["labels"].numpy(), x["loss_mask"].numpy()
    nll = -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    per_token = 0.8 * nll + 0.2 * (-log_probs.mean(-1))
    expected = (per_token * weights).sum() / weights.sum()
    assert loss == pytest.approx(expected, rel=1e-5)
    unsmoothed = (nll * weights).sum() / weights.sum()
    assert abs(loss - unsmoothed) > 1e-3  # smoothing really reached the loss


def test_save_pretrained_loads_in_paddlenlp_and_back(tmp_path):
    ours, _ = twin_models()
    x = glm_inputs(ours.config.vocab_size)
    expected = ours(x["input_ids"], x["position_ids"], x["mask_4d"], return_dict=True).logits.numpy()
    ours.save_pretrained(tmp_path / "ours")
    saved = paddle.load(str(tmp_path / "ours" / "model_state.pdparams"))
    theirs = PaddleNLPGLM.from_pretrained(tmp_path / "ours")
    assert sorted(saved) == sorted(theirs.state_dict())  # no missing, no unexpected keys
    theirs.eval()
    loaded = theirs(x["input_ids"], x["position_ids"], x["mask_4d"], return_dict=True).logits.numpy()
    assert relative_error(loaded, expected) < 1e-5
    theirs.save_pretrained(tmp_path / "theirs")
    back = GLMForConditionalGeneration.from_pretrained(tmp_path / "theirs")
    back.eval()
    reloaded = back(x["input_ids"], x["position_ids"], x["mask_4d"], return_dict=True).logits.numpy()
    np.testing.assert_array_equal(reloaded, expected)


def test_cached_decoding_equals_full_forward():
    ours, _ = twin_models()
    prefix = 5  # the whole source is in the prefix, as in generation: then one token per step
    x = glm_inputs(ours.config.vocab_size, seps=[3, 4, 5])
    full = ours(x["input_ids"], x["position_ids"], x["sep"], return_dict=True).logits.numpy()
    out = ours(x["input_ids"][:, :prefix], x["position_ids"][:, :, :prefix], x["sep"], use_cache=True, return_dict=True)
    cache, steps = out.past_key_values, [out.logits.numpy()]
    for i in range(prefix, LENGTH):
        step = ours(
            x["input_ids"][:, i : i + 1],
            x["position_ids"][:, :, i : i + 1],
            x["mask_4d"][:, :, i : i + 1, : i + 1],
            cache=cache,
            use_cache=True,
            return_dict=True,
        )
        cache = step.past_key_values
        assert cache[0][0].shape == [BATCH, 4, i + 1, 8]  # keys of memory + new token, per layer
        steps.append(step.logits.numpy())
    assert relative_error(np.concatenate(steps, axis=1), full) < 1e-5


def test_fused_attention_path_equals_manual_path():
    ours, _ = twin_models()
    fused, _ = twin_models(use_flash_attention=True)
    x = glm_inputs(ours.config.vocab_size)
    a = ours(x["input_ids"], x["position_ids"], x["sep"], return_dict=True).logits.numpy()
    b = fused(x["input_ids"], x["position_ids"], x["sep"], return_dict=True).logits.numpy()
    assert relative_error(b, a) < 1e-5


def test_attention_scale_is_numerically_neutral_in_float32():
    ours, _ = twin_models()
    scaled, _ = twin_models(attention_scale=4.0)
    x = glm_inputs(ours.config.vocab_size)
    a = ours(x["input_ids"], x["position_ids"], x["sep"], return_dict=True).logits.numpy()
    b = scaled(x["input_ids"], x["position_ids"], x["sep"], return_dict=True).logits.numpy()
    assert relative_error(b, a) < 1e-5


def train_steps(model, x, steps, learning_rate=1e-2):
    """A few AdamW steps on batch `x`, over the parameters that train (all, or LoRA's adapters)."""
    optimizer = paddle.optimizer.AdamW(learning_rate, parameters=[p for p in model.parameters() if not p.stop_gradient])
    model.train()
    for _ in range(steps):
        loss = model(x["input_ids"], x["position_ids"], x["sep"], labels=x["labels"], loss_mask=x["loss_mask"])[0]
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()


def train_loss_and_grads(model, x, seed):
    model.train()
    paddle.seed(seed)
    loss = model(x["input_ids"], x["position_ids"], x["sep"], labels=x["labels"], loss_mask=x["loss_mask"])[0]
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    return float(loss), grads


def test_recompute_gives_same_loss_and_gradients_with_dropout(monkeypatch):
    kwargs = dict(embedding_dropout_prob=0.1, attention_dropout_prob=0.1, output_dropout_prob=0.1)
    model, _ = twin_models(**kwargs)
    x = glm_inputs(model.config.vocab_size)
    plain_loss, plain_grads = train_loss_and_grads(model, x, seed=3)

    calls = []
    real_recompute = glm.modeling.recompute
    monkeypatch.setattr(glm.modeling, "recompute", lambda *a, **k: calls.append(1) or real_recompute(*a, **k))
    model.glm.transformer.enable_recompute = True
    recomputed_loss, recomputed_grads = train_loss_and_grads(model, x, seed=3)
    assert len(calls) == model.config.num_layers
    assert recomputed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == recomputed_grads.keys()
    for name, grad in plain_grads.items():
        np.testing.assert_allclose(recomputed_grads[name], grad, rtol=1e-5, atol=1e-7, err_msg=name)


def test_dropout_drops_in_training_only():
    dropping, _ = twin_models(embedding_dropout_prob=0.3, attention_dropout_prob=0.3, output_dropout_prob=0.3)
    plain, _ = twin_models()  # the same weights (same seed), no dropout
    x = glm_inputs(plain.config.vocab_size)

    def logits(model):
        return model(x["input_ids"], x["position_ids"], x["sep"], return_dict=True).logits.numpy()

    np.testing.assert_array_equal(logits(dropping), logits(plain))  # eval mode: dropout is the identity
    dropping.train()
    paddle.seed(0)
    assert relative_error(logits(dropping), logits(plain)) > 1e-2


def test_lora_trains_only_adapter_weights_and_recomputes_every_layer(monkeypatch):
    model, _ = twin_models()
    # `.*mlp.*` also names the GLMMLP container, which PaddleNLP's LoRAModel refuses: apply_lora narrows it.
    lora_model = apply_lora(model, rank=4, alpha=8, target_modules=[".*query_key_value.*", ".*attention.dense.*", ".*mlp.*"])
    trainable = [n for n, p in lora_model.named_parameters() if not p.stop_gradient]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("dense_h_to_4h" in n for n in trainable) and any("attention.dense" in n for n in trainable)
    before = {n: p.numpy().copy() for n, p in lora_model.named_parameters()}

    calls = []
    real_recompute = glm.modeling.recompute
    monkeypatch.setattr(glm.modeling, "recompute", lambda *a, **k: calls.append(1) or real_recompute(*a, **k))
    model.glm.transformer.enable_recompute = True  # frozen embeddings: PaddleNLP skips layer 0 here
    train_steps(lora_model, glm_inputs(model.config.vocab_size), steps=2)
    assert len(calls) == 2 * model.config.num_layers
    changed = {n for n, p in lora_model.named_parameters() if not np.array_equal(p.numpy(), before[n])}
    # lora_A starts random and lora_B at zero, so after two steps both have moved; nothing else has.
    assert changed == {n for n in trainable}


def test_half_precision_gives_a_clear_error_on_cpu_or_stays_close_on_gpu():
    model, _ = twin_models()
    x = glm_inputs(model.config.vocab_size)
    reference = model(x["input_ids"], x["position_ids"], x["sep"], return_dict=True).logits.numpy()
    if paddle.device.get_device().startswith("cpu"):
        # Paddle's CPU has no bfloat16 matmul/LayerNorm/softmax kernels (and amp.decorate is a no-op on
        # CPU): a bfloat16 model must stop with our one-line reason, not a kernel-registry dump.
        model.to(dtype="bfloat16")
        with pytest.raises(RuntimeError, match="bfloat16 needs a GPU"):
            model(x["input_ids"], x["position_ids"], x["sep"])
    else:
        half = paddle.amp.decorate(models=model, level="O2", dtype="bfloat16")
        assert half.glm.transformer.layers[0].attention.query_key_value.weight.dtype == paddle.bfloat16
        with paddle.amp.auto_cast(level="O2", dtype="bfloat16"):
            logits = half(x["input_ids"], x["position_ids"], x["sep"], return_dict=True).logits
        assert relative_error(logits.astype("float32").numpy(), reference) < 3e-2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fused_mask_value_cannot_overflow_in_half_precision(dtype):
    value = glm.modeling._fused_mask_value(getattr(paddle, dtype))
    finfo = np.finfo(np.float16) if dtype == "float16" else None
    lowest = float(finfo.min) if finfo is not None else -3.3895e38
    assert lowest < value + (-1e3) < 0 and value < -1e4


def test_bad_attention_mask_shape_is_a_clear_error(tiny_model):
    ids = paddle.zeros([2, 5], "int64")
    with pytest.raises(ValueError, match="4-D attention_mask must end in"):
        tiny_model(ids, attention_mask=paddle.ones([2, 1, 5, 4]))
    with pytest.raises(ValueError, match="1-D .* or 4-D"):
        tiny_model(ids, attention_mask=paddle.ones([2, 5]))


def test_a_full_decoding_cache_raises_instead_of_dropping_keys():
    memory = (paddle.zeros([2, 4, 3, 8]), paddle.zeros([2, 4, 3, 8]))  # 2 sources, 4 heads, 3 positions
    cache = DecodingCache(memory, beams=2, capacity=1)
    mask = DecodingMask(np.ones([2, 3], dtype=bool), beams=2, capacity=1)
    step = paddle.ones([2, 4, 2, 8])
    mask.advance(3)
    cache.write(step, step)
    assert cache.memory_length == 5
    with pytest.raises(ValueError, match="DecodingCache is full"):
        cache.write(step, step)
    with pytest.raises(ValueError, match="DecodingMask is full"):
        mask.advance(5)


def test_recompute_keeps_the_memory_a_training_forward_is_given():
    """A training forward over memory (per-layer keys and values, e.g. a trainable prefix): recompute gives the
    loss and gradients, the memory's too, of the plain forward (it used to drop the memory silently)."""
    model, _ = twin_models()
    x = glm_inputs(model.config.vocab_size)
    batch, heads = x["input_ids"].shape[0], model.config.num_attention_heads
    head_dim, prefix = model.config.hidden_size // heads, 3
    paddle.seed(5)
    memory = [tuple(paddle.create_parameter([batch, heads, prefix, head_dim], "float32") for _ in range(2))
              for _ in range(model.config.num_layers)]  # fmt: skip

    def loss_and_grads():
        model.train()
        loss = model(x["input_ids"], x["position_ids"], x["sep"] + prefix, labels=x["labels"], loss_mask=x["loss_mask"],
                     cache=memory)[0]  # fmt: skip
        loss.backward()
        grads = [t.grad.numpy().copy() for layer in memory for t in layer]
        grads += [p.grad.numpy().copy() for p in model.parameters() if p.grad is not None]
        model.clear_gradients()
        for layer in memory:
            for t in layer:
                t.clear_gradient()
        return float(loss), grads

    plain_loss, plain_grads = loss_and_grads()
    model.glm.transformer.enable_recompute = True
    recomputed_loss, recomputed_grads = loss_and_grads()
    assert recomputed_loss == pytest.approx(plain_loss, rel=1e-6)
    for recomputed, plain in zip(recomputed_grads, plain_grads):
        np.testing.assert_allclose(recomputed, plain, rtol=1e-5, atol=1e-7)

"""P-tuning v2 prefixes (glm/prefix.py): the oracle is the base model with real tokens in front. A prefix set to
the per-layer keys and values of N real tokens must give what the base gives on those tokens followed by
the input, with the input's positions and a mask in which the input sees all N tokens."""

import numpy as np
import paddle
import pytest
from conftest import tiny_config_kwargs

import glm
from glm.generation import GenerationConfig, GLMGenerator
from glm.model_runner import ModelRunner
from glm.prefix import GLMPrefixModel, apply_prefix, layer_caches
from glm.tokenization import GLMSpecialIds


def set_prefix_to(prefixed: GLMPrefixModel, caches):
    """The prefix (without projection) set to `caches`: per layer (keys, values) [1, heads, N, head_dim]."""
    states = paddle.concat([paddle.stack([k[0] for k, _ in caches]), paddle.stack([v[0] for _, v in caches])])
    # [layers * 2, heads, N, head_dim] -> the embedding's rows [N, layers * 2 * heads * head_dim]
    weight = states.transpose([2, 0, 1, 3]).reshape([states.shape[2], -1])
    prefixed.prefix_encoder[0].weight.set_value(weight)


def real_token_states(model, tokens, positions):
    """Per-layer keys and values of `tokens` (bidirectional among themselves) at 2-D `positions`."""
    ids = paddle.to_tensor([tokens], dtype="int64")
    position_ids = paddle.to_tensor([positions], dtype="int64")
    _, cache = model.glm(ids, position_ids, paddle.to_tensor([len(tokens)]), use_cache=True, return_dict=False)
    return cache


@pytest.fixture
def prefixed_pair():
    paddle.seed(8)  # a model whose greedy answers the 3-token prefix changes
    base = glm.GLMForConditionalGeneration(glm.GLMConfig(**tiny_config_kwargs()))
    base.eval()
    prefixed = apply_prefix(base, num_prefix_tokens=3)
    prefixed.eval()
    tokens, positions = [11, 12, 13], [[0, 1, 2], [0, 0, 0]]
    set_prefix_to(prefixed, real_token_states(base, tokens, positions))
    return base, prefixed, tokens, positions


def test_layer_caches_reads_keys_then_values():
    # [B, N, layers * 2, heads, head_dim]: layer l's keys at l, its values at layers + l.
    states = paddle.arange(1 * 2 * 4 * 3 * 5, dtype="float32").reshape([1, 2, 4, 3, 5])
    caches = layer_caches(states)
    assert len(caches) == 2
    np.testing.assert_array_equal(caches[1][0].numpy(), states[:, :, 1].transpose([0, 2, 1, 3]).numpy())
    np.testing.assert_array_equal(caches[1][1].numpy(), states[:, :, 3].transpose([0, 2, 1, 3]).numpy())


def test_prefix_of_real_token_states_equals_those_tokens_in_front(prefixed_pair):
    base, prefixed, tokens, positions = prefixed_pair
    source = [[1, 20, 21, 22, 2], [1, 30, 3, 31, 2]]
    target_positions = [[[0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]] * 2
    sep = 3  # the first 3 are bidirectional, the rest causal
    out = prefixed(input_ids=paddle.to_tensor(source), position_ids=paddle.to_tensor(target_positions),
                   attention_mask=paddle.to_tensor([sep, sep]), return_dict=False)[0]
    # The oracle: the tokens in front (seeing each other only), then the rows, which see all of them.
    n, q = len(tokens), len(source[0])
    mask = np.zeros((2, 1, n + q, n + q), dtype="int64")
    mask[:, :, :n, :n] = 1
    mask[:, :, n:, :n] = 1
    for i in range(q):
        mask[:, :, n + i, n : n + max(sep, i + 1)] = 1
    ids = paddle.to_tensor([tokens + row for row in source], dtype="int64")
    both = paddle.to_tensor([[positions[0] + p[0], positions[1] + p[1]] for p in target_positions], dtype="int64")
    expected = base(input_ids=ids, position_ids=both, attention_mask=paddle.to_tensor(mask), return_dict=False)[0]
    np.testing.assert_allclose(out.numpy(), expected[:, n:].numpy(), rtol=1e-4, atol=1e-5)
    # and the prefix matters: a base without it answers otherwise
    plain = base(input_ids=paddle.to_tensor(source), position_ids=paddle.to_tensor(target_positions),
                 attention_mask=paddle.to_tensor([sep, sep]), return_dict=False)[0]
    assert np.abs(plain.numpy() - out.numpy()).max() > 1e-3


IDS = GLMSpecialIds(cls=90, eos=91, sop=95, eop=89, mask=92, smask=93, gmask=94)


class Positional:
    """The prefixed model called as the decoding oracles call a GLM: model(ids, positions, mask)."""

    def __init__(self, prefixed):
        self.prefixed = prefixed

    def __call__(self, ids, positions, mask, return_dict=True):
        return self.prefixed(input_ids=ids, position_ids=positions, attention_mask=mask, return_dict=return_dict)


def test_decoding_with_a_prefix_equals_full_forwards_on_every_path(prefixed_pair):
    from test_generation import sequence_logprob, uncached_greedy

    base, prefixed, _, _ = prefixed_pair
    oracle = Positional(prefixed)
    generator = GLMGenerator(prefixed, IDS)
    sources = [[IDS.cls, 5, 6, 7, IDS.gmask, IDS.eos], [IDS.cls, 8, IDS.gmask, IDS.eos]]
    greedy = generator.generate(sources, GenerationConfig(decode_strategy="greedy_search", tgt_length=6))
    for src, result in zip(sources, greedy):
        assert result[0][0] == uncached_greedy(oracle, src, 6)
    assert greedy != GLMGenerator(base, IDS).generate(sources, GenerationConfig(decode_strategy="greedy_search", tgt_length=6))
    # beam search: every returned answer scored by full forwards, in order, the best one the greedy-safe max
    beams = generator.generate(sources[:1], GenerationConfig(num_beams=4, tgt_length=4, length_penalty=0.0,
                                                             num_return_sequences=4))[0][0]
    scores = [sequence_logprob(oracle, sources[0], a, stop=len(a) < 4) for a in beams]
    assert scores == sorted(scores, reverse=True)
    # two blanks: the second decoded with the first answer in memory, after the prefix
    src = [IDS.cls, 5, IDS.mask, 6, 7, IDS.smask, 8, IDS.eos]
    first, second = [a[0] for a in generator.generate([src], GenerationConfig(decode_strategy="greedy_search", tgt_length=4))[0]]
    assert first == uncached_greedy(oracle, src, 4)
    assert second == uncached_greedy(oracle, src, 4, earlier=[first])


def test_sampling_with_a_prefix_draws_from_the_prefixed_distribution(prefixed_pair):
    from test_generation import next_token_logprobs

    _, prefixed, _, _ = prefixed_pair
    src = [IDS.cls, 5, 6, IDS.gmask, IDS.eos]
    config = GenerationConfig(decode_strategy="sampling", tgt_length=1, top_k=1, num_return_sequences=2, seed=3)
    answers = GLMGenerator(prefixed, IDS).generate([src], config)[0][0]
    best = int(next_token_logprobs(Positional(prefixed), src, [[]]).argmax())
    assert all(answer == ([best] if best not in (IDS.eop, IDS.eos) else []) for answer in answers)


def test_beams_share_the_prefix_memory_of_their_source(prefixed_pair):
    _, prefixed, _, _ = prefixed_pair
    runner = ModelRunner(prefixed)
    cache, valid = runner.encode([[IDS.cls, 5, IDS.gmask, IDS.eos], [IDS.cls, IDS.gmask, IDS.eos]], IDS.pad)
    assert valid.shape == (2, 3 + 4) and valid[:, :3].all()  # the prefix, then the left-padded sources
    rows = runner.start_rows(cache, valid, np.array([2, 1]), copies=5, capacity=4)
    assert rows.batch.caches[0].keys.shape[0] == 2  # one memory per source, not per beam


def test_the_engine_steps_sources_with_and_without_a_prefix_together(prefixed_pair):
    """One engine, the base's generator: sources after the prefix and sources without it decode in the same
    steps, each exactly as generate alone with its own model (the prefixed model's, the base's)."""
    from test_serving import Recorder

    from glm.serving.engine import Engine, Source

    base, prefixed, _, _ = prefixed_pair
    plain, with_prefix = GLMGenerator(base, IDS), GLMGenerator(prefixed, IDS)
    configs = [GenerationConfig(decode_strategy="greedy_search", tgt_length=6),
               GenerationConfig(num_beams=3, tgt_length=5, num_return_sequences=2),
               GenerationConfig(decode_strategy="sampling", tgt_length=5, top_k=5, num_return_sequences=2, seed=4)]
    sources = [[IDS.cls, 5, 6, 7, IDS.gmask, IDS.eos], [IDS.cls, 8, IDS.mask, 9, IDS.smask, IDS.eos]]
    work = [(ids, config, prefix) for ids in sources for config in configs for prefix in (None, prefixed)]
    expected = [(with_prefix if prefix else plain).generate([ids], config)[0] for ids, config, prefix in work]
    assert any(a != b for a, b in zip(expected[::2], expected[1::2]))  # the prefix changes answers
    engine = Engine(plain)
    rows = []
    engine.on_step = rows.append
    listeners = [Recorder() for _ in work]
    engine.submit([Source(ids, config, listener, prefix=prefix) for (ids, config, prefix), listener in zip(work, listeners)])
    while engine._live or engine._queue:
        engine.run_once()
    assert [listener.result for listener in listeners] == expected
    assert max(rows) > 2 * 5  # the sources shared steps


def test_recompute_gives_the_prefix_the_same_gradients():
    paddle.seed(3)
    base = glm.GLMForConditionalGeneration(glm.GLMConfig(**tiny_config_kwargs()))
    prefixed = apply_prefix(base, 4, projection=True)
    prefixed.train()
    inputs = dict(input_ids=paddle.to_tensor([[1, 5, 6, 7, 8, 9, 2, 3]]), attention_mask=paddle.to_tensor([6]),
                  position_ids=paddle.to_tensor([[[0, 1, 2, 3, 4, 5, 6, 6], [0, 0, 0, 0, 0, 0, 1, 2]]]),
                  labels=paddle.to_tensor([[0, 0, 0, 0, 0, 0, 10, 11]]), loss_mask=paddle.to_tensor([[0, 0, 0, 0, 0, 0, 1, 1]]))
    gradients = []
    for recompute in (False, True):
        base.glm.transformer.enable_recompute = recompute
        prefixed.clear_gradients()
        prefixed(**inputs, return_dict=False)[0].backward()
        gradients.append({name: p.grad.numpy().copy() for name, p in prefixed.prefix_encoder.named_parameters()})
        assert all(p.grad is None for p in base.parameters())  # the base is frozen
    for name, gradient in gradients[0].items():
        assert np.abs(gradient).max() > 0
        np.testing.assert_array_equal(gradient, gradients[1][name], err_msg=name)

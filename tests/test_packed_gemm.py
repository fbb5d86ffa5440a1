"""The LM head and the layers' weights through MKL's packed GEMM equal paddle's own products, and decoding
gives the same answers with them."""

import numpy as np
import paddle
import pytest
from conftest import tiny_config_kwargs

import glm.model_runner
import glm.packed_gemm
from glm import GLMConfig, GLMForConditionalGeneration
from glm.generation import GenerationConfig, GLMGenerator
from glm.packed_gemm import PackedLinears, packed_transposed
from glm.tokenization import GLMSpecialIds

needs_mkl = pytest.mark.skipif(glm.packed_gemm._mkl() is None, reason="this Paddle has no bundled MKL")


@needs_mkl
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_packed_product_equals_matmul(rows):
    paddle.seed(0)
    weight = paddle.randn([1000, 64])  # [n, k], as the word embeddings [vocab, hidden]
    packed = packed_transposed(weight, 20)
    x = paddle.randn([rows, 64])
    expected = paddle.matmul(x, weight, transpose_y=True).numpy()
    np.testing.assert_allclose(packed.matmul(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    strided = paddle.randn([rows, 1, 64])[:, -1]  # the last position of each row, as decoding takes it
    np.testing.assert_allclose(packed.matmul(strided).numpy(), paddle.matmul(strided, weight, transpose_y=True).numpy(),
                               rtol=1e-5, atol=1e-5)
    assert packed.matmul(paddle.randn([2, rows, 64])).shape == [2, rows, 1000]


class AdapterLinear(paddle.nn.Linear):
    """Stands for a LoRA layer: a subclass of nn.Linear whose forward adds to the weight's product."""

    def forward(self, x):
        return super().forward(x) + 1.0


@needs_mkl
def test_packed_linears_equal_the_layers_and_leave_subclasses_alone():
    paddle.seed(1)
    model = paddle.nn.Sequential(paddle.nn.Linear(64, 96), paddle.nn.Sequential(paddle.nn.Linear(96, 32)), AdapterLinear(32, 8))
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.Linear):
            layer.bias.set_value(paddle.randn(layer.bias.shape))  # a bias the packed product must add
    packed = PackedLinears(model, rows=16)
    assert len(packed) == 2  # the adapter layer is not packed
    plain, inner, adapter = model[0], model[1][0], model[2]
    for x in (paddle.randn([5, 64]), paddle.randn([4, 1, 64]), paddle.randn([16, 64])):
        np.testing.assert_allclose(packed.linear(plain, x).numpy(), plain(x).numpy(), rtol=1e-5, atol=1e-5)
    hidden = paddle.randn([3, 96])
    np.testing.assert_allclose(packed.linear(inner, hidden).numpy(), inner(hidden).numpy(), rtol=1e-5, atol=1e-5)
    small = paddle.randn([3, 32])
    assert np.array_equal(packed.linear(adapter, small).numpy(), adapter(small).numpy())  # its own forward
    for rows in (1, 40):  # one row, or more rows than packed for: the layer itself
        x = paddle.randn([rows, 64])
        assert np.array_equal(packed.linear(plain, x).numpy(), plain(x).numpy())


def test_nothing_is_packed_where_mkl_cannot_run_it(monkeypatch):
    assert packed_transposed(paddle.randn([10, 4]).astype("float64"), 4) is None
    assert packed_transposed(paddle.randn([10]), 4) is None
    monkeypatch.setattr(glm.packed_gemm, "_mkl", lambda: None)  # a Paddle build without MKL
    assert packed_transposed(paddle.randn([10, 4]), 4) is None


IDS = GLMSpecialIds(cls=90, eos=91, sop=95, eop=89, mask=92, smask=93, gmask=94)


@needs_mkl
def test_decoding_gives_the_same_answers_with_and_without_the_packed_weights(monkeypatch):
    paddle.seed(7)
    model = GLMForConditionalGeneration(GLMConfig(**tiny_config_kwargs(initializer_range=0.3)))
    model.eval()
    for layer in model.sublayers():
        if type(layer) is paddle.nn.Linear:
            layer.bias.set_value(0.3 * paddle.randn(layer.bias.shape))  # initialised to 0: make them count
    used = []
    real_linear = PackedLinears.linear
    monkeypatch.setattr(PackedLinears, "linear", lambda self, layer, x: used.append(x.shape[0]) or real_linear(self, layer, x))
    sources = [[IDS.cls, 5, 6, 7, IDS.gmask, IDS.eos], [IDS.cls, 8, IDS.mask, 9, 10, 11, IDS.eos]]
    configs = [GenerationConfig(decode_strategy="greedy_search", tgt_length=12),
               GenerationConfig(num_beams=4, tgt_length=12, length_penalty=0.7, num_return_sequences=2)]
    packed_calls = []
    real = glm.model_runner.packed_transposed
    monkeypatch.setattr(glm.model_runner, "packed_transposed",
                        lambda weight, rows: packed_calls.append(rows) or real(weight, rows))
    generator = GLMGenerator(model, IDS)
    packed = [generator.generate(sources, config) for config in configs]
    assert packed_calls == [2, 8]  # packed for each call's rows (the runner's pack, dropped after the call)
    assert used  # the layers' products went through their packs
    monkeypatch.setattr(glm.model_runner, "packed_transposed", lambda weight, rows: None)
    assert [generator.generate(sources, config) for config in configs] == packed

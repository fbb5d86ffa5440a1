"""The LM head through MKL's packed GEMM equals paddle.matmul, and decoding gives the same answers with it."""

import numpy as np
import paddle
import pytest
from conftest import tiny_config_kwargs

import glm.model_runner
import glm.packed_gemm
from glm import GLMConfig, GLMForConditionalGeneration
from glm.generation import GenerationConfig, GLMGenerator
from glm.packed_gemm import packed_transposed
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


def test_nothing_is_packed_where_mkl_cannot_run_it(monkeypatch):
    assert packed_transposed(paddle.randn([10, 4]).astype("float64"), 4) is None
    assert packed_transposed(paddle.randn([10]), 4) is None
    monkeypatch.setattr(glm.packed_gemm, "_mkl", lambda: None)  # a Paddle build without MKL
    assert packed_transposed(paddle.randn([10, 4]), 4) is None


IDS = GLMSpecialIds(cls=90, eos=91, sop=95, eop=89, mask=92, smask=93, gmask=94)


@needs_mkl
def test_decoding_gives_the_same_answers_with_and_without_the_packed_head(monkeypatch):
    paddle.seed(7)
    model = GLMForConditionalGeneration(GLMConfig(**tiny_config_kwargs(initializer_range=0.3)))
    model.eval()
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
    monkeypatch.setattr(glm.model_runner, "packed_transposed", lambda weight, rows: None)
    assert [generator.generate(sources, config) for config in configs] == packed

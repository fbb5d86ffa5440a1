"""Decoding against uncached, brute-force oracles built from full forward passes."""

import itertools

import numpy as np
import paddle
import pytest
from conftest import tiny_config_kwargs

from glm import GLMConfig, GLMForConditionalGeneration
from glm.generation import GenerationConfig, GLMGenerator
from glm.search import id_runs, process_scores, top_k_indices
from glm.model_runner import DecodingRows, ModelRunner, without_last_column
from glm.tokenization import GLMSpecialIds

IDS = GLMSpecialIds(cls=90, eos=91, sop=95, eop=89, mask=92, smask=93, gmask=94)
VOCAB = 96


def _log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def model_with_seed(seed, **overrides):
    paddle.seed(seed)
    model = GLMForConditionalGeneration(GLMConfig(**tiny_config_kwargs(**overrides)))
    model.eval()
    return model


def source(*tokens, blank=IDS.gmask):
    return [IDS.cls, *tokens, blank, IDS.eos]


def full_sequence_inputs(src, answers):
    """Source + (sop answer) per blank, with GLM's positions and a 4-D mask: the oracle's layout."""
    blanks = [i for i, t in enumerate(src) if t in IDS.mask_ids]
    ids, positions, blocks = list(src), list(range(len(src))), [0] * len(src)
    for blank, answer in zip(blanks, answers):
        ids += [IDS.sop] + list(answer)
        positions += [blank] * (len(answer) + 1)
        blocks += list(range(1, len(answer) + 2))
    n, sep = len(ids), len(src)
    keys, queries = np.arange(n)[None, :], np.arange(n)[:, None]
    mask = ((keys < sep) | (keys <= queries))[None, None].astype("int64")
    return (paddle.to_tensor([ids]), paddle.to_tensor([[positions, blocks]]), paddle.to_tensor(mask))


def next_token_logprobs(model, src, answers):
    """Log-probabilities of the token after the last one, by a full uncached forward pass."""
    logits = model(*full_sequence_inputs(src, answers), return_dict=True).logits.numpy()[0, -1]
    return _log_softmax(logits.astype("float64"))


def sequence_logprob(model, src, answer, stop=True):
    ids, positions, mask = full_sequence_inputs(src, [answer])
    logprobs = _log_softmax(model(ids, positions, mask, return_dict=True).logits.numpy()[0].astype("float64"))
    targets = list(answer) + ([IDS.eop] if stop else [])
    start = len(src)  # the sop position predicts answer[0]
    return sum(logprobs[start + i, token] for i, token in enumerate(targets))


def uncached_greedy(model, src, tgt_length, banned=(), earlier=()):
    """The greedy answer of the blank after `earlier` (the answers of the blanks before it, in memory)."""
    answer = []
    for _ in range(tgt_length):
        scores = next_token_logprobs(model, src, [*earlier, answer])
        scores[list(banned)] = -np.inf
        token = int(scores.argmax())
        if token in (IDS.eop, IDS.eos):
            break
        answer.append(token)
    return answer


def biased(model, bias):
    """Shift the LM head's logits of chosen tokens ({token: bias}), e.g. to make the model want to stop."""
    original = model.lm_logits
    bias_vector = paddle.zeros([VOCAB])
    for token, value in bias.items():
        bias_vector[token] = value
    model.lm_logits = lambda hidden, **kwargs: original(hidden, **kwargs) + bias_vector
    return model


def test_cached_greedy_equals_uncached_greedy_for_a_padded_batch():
    model = model_with_seed(3)
    sources = [source(5, 6, 7, 8, 9, 10), source(11, 12), source(13, 14, 15)]
    generator = GLMGenerator(model, IDS)
    results = generator.generate(sources, GenerationConfig(decode_strategy="greedy_search", tgt_length=8))
    for src, result in zip(sources, results):
        assert result[0][0] == uncached_greedy(model, src, 8)
    assert any(len(r[0][0]) == 8 for r in results)  # a non-trivial comparison: long answers


def test_beam_search_finds_the_exhaustive_best_sequence():
    allowed = [20, 21, 22]
    model = biased(model_with_seed(11), {token: 4.0 for token in allowed})  # not just the empty answer
    banned = [t for t in range(VOCAB) if t not in allowed + [IDS.eop]]
    src = source(5, 6, 7)
    tgt_length = 3
    # every answer: up to tgt_length tokens ending in eop, or tgt_length tokens cut by the length limit
    candidates = []
    for length in range(tgt_length + 1):
        for answer in itertools.product(allowed, repeat=length):
            candidates.append((sequence_logprob(model, src, answer, stop=True), list(answer)))
            if length == tgt_length:
                candidates.append((sequence_logprob(model, src, answer, stop=False), list(answer)))
    _, best = max(candidates)
    assert len(best) >= 2  # a search problem, not the empty answer
    generator = GLMGenerator(model, IDS, banned_ids=banned)
    config = GenerationConfig(num_beams=9, tgt_length=tgt_length, length_penalty=0.0, num_return_sequences=3)
    returned = generator.generate([src], config)[0][0]
    assert returned[0] == best
    # THUDM's search keeps an end only when it ranks within the beam width, so the runners-up need not
    # be the global 2nd and 3rd; they must still come out in the order of their true scores.
    # (an answer of tgt_length tokens was cut by the limit; a shorter one ended with eop)
    true_scores = [sequence_logprob(model, src, a, stop=len(a) < tgt_length) for a in returned]
    assert true_scores == sorted(true_scores, reverse=True)


def test_length_penalty_changes_the_ranking_as_thudm_scores_it():
    model = model_with_seed(11)
    generator = GLMGenerator(model, IDS, banned_ids=[t for t in range(VOCAB) if t not in (20, 21, 22, IDS.eop)])
    src = source(5, 6, 7)
    for penalty in (0.0, 2.0):
        config = GenerationConfig(num_beams=9, tgt_length=3, length_penalty=penalty, num_return_sequences=9)
        answers = generator.generate([src], config)[0][0]
        scores = [sequence_logprob(model, src, a, stop=len(a) < 3) / max(len(a), 1) ** penalty for a in answers]
        assert scores == sorted(scores, reverse=True)
    short = generator.generate([src], GenerationConfig(num_beams=9, tgt_length=3, length_penalty=0.0))[0][0][0]
    long = generator.generate([src], GenerationConfig(num_beams=9, tgt_length=3, length_penalty=5.0))[0][0][0]
    assert len(long) >= len(short) and long != short


def test_batch_equals_one_row_at_a_time():
    model = model_with_seed(5)
    sources = [source(5, 6, 7, 8, 9), source(11, 12), source(30, 31, 32, 33)]
    generator = GLMGenerator(model, IDS)
    for config in (
        GenerationConfig(decode_strategy="greedy_search", tgt_length=6),
        GenerationConfig(num_beams=4, tgt_length=6, length_penalty=0.7, no_repeat_ngram_size=2, num_return_sequences=2),
    ):
        batched = generator.generate(sources, config)
        for src, result in zip(sources, batched):
            assert generator.generate([src], config)[0] == result


@pytest.mark.parametrize("strategy", ["greedy_search", "beam_search"])
def test_min_length_blocks_the_end(strategy):
    model = biased(model_with_seed(5), {IDS.eop: 6.0})
    generator = GLMGenerator(model, IDS)
    sources = [source(5, 6, 7), source(8, 9)]
    free = generator.generate(sources, GenerationConfig(decode_strategy=strategy, num_beams=3, tgt_length=10))
    assert all(len(r[0][0]) < 5 for r in free)  # without the processor they stop early
    held = generator.generate(
        sources, GenerationConfig(decode_strategy=strategy, num_beams=3, tgt_length=10, min_tgt_length=5)
    )
    assert all(len(r[0][0]) >= 5 for r in held)


@pytest.mark.parametrize("strategy", ["greedy_search", "beam_search"])
def test_no_repeat_ngram_holds(strategy):
    model = model_with_seed(8)
    generator = GLMGenerator(model, IDS, banned_ids=[IDS.eop, IDS.eos])  # run to the length limit

    def bigrams(tokens):
        return list(zip(tokens, tokens[1:]))

    sources = [source(5, 6), source(7, 8, 9)]
    free = generator.generate(sources, GenerationConfig(decode_strategy=strategy, num_beams=3, tgt_length=24))
    assert any(len(set(bigrams(r[0][0]))) < len(bigrams(r[0][0])) for r in free)  # repeats without it
    held = generator.generate(
        sources, GenerationConfig(decode_strategy=strategy, num_beams=3, tgt_length=24, no_repeat_ngram_size=2)
    )
    for result in held:
        answer = result[0][0]
        assert len(answer) == 24 and len(set(bigrams(answer))) == len(bigrams(answer))


# init 0.3: answers that depend on what the memory holds (at 0.02 a wrong memory can still give them)
@pytest.mark.parametrize("seed, initializer_range", [(3, 0.02), (5, 0.3), (8, 0.3)])
def test_two_blanks_are_filled_left_to_right_with_the_first_answer_in_memory(seed, initializer_range):
    model = model_with_seed(seed, initializer_range=initializer_range)
    sources = [[IDS.cls, 5, IDS.mask, 6, 7, IDS.smask, 8, IDS.eos], [IDS.cls, 9, 10, IDS.mask, 11, IDS.mask, IDS.eos]]
    generator = GLMGenerator(model, IDS)
    results = generator.generate(sources, GenerationConfig(decode_strategy="greedy_search", tgt_length=5))
    for src, answers in zip(sources, results):
        assert len(answers) == 2
        first, second = answers[0][0], answers[1][0]
        assert first == uncached_greedy(model, src, 5)
        # the oracle for the second blank: source, then sop + first answer at blank 1, then sop at blank 2
        assert second == uncached_greedy(model, src, 5, earlier=[first])


def test_sampling_is_reproducible_and_respects_top_k():
    model = model_with_seed(3)
    generator = GLMGenerator(model, IDS)
    config = GenerationConfig(decode_strategy="sampling", tgt_length=6, top_k=1, seed=0)
    # top_k = 1 is greedy whatever the seed
    assert generator.generate([source(5, 6)], config)[0][0][0] == uncached_greedy(model, source(5, 6), 6)
    wide = GenerationConfig(decode_strategy="sampling", tgt_length=6, top_p=0.9, temperature=1.5, seed=4,
                            num_return_sequences=3)
    assert generator.generate([source(5, 6)], wide) == generator.generate([source(5, 6)], wide)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="num_return_sequences cannot exceed num_beams"):
        GenerationConfig(num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="decode_strategy must be one of"):
        GenerationConfig(decode_strategy="beam")
    generator = GLMGenerator(model_with_seed(1), IDS)
    with pytest.raises(ValueError, match="holds no \\[MASK\\]"):
        generator.generate([[IDS.cls, 5, IDS.eos]], GenerationConfig())
    with pytest.raises(ValueError, match="max_sequence_length is 64"):
        generator.generate([source(5)], GenerationConfig(tgt_length=65))


class ConcatCacheRows(DecodingRows):  # its own cache; DecodingRows.decode runs the search over it
    """The cache layout before DecodingCache, kept as the reference: every row carries its own copy of the
    memory, the step's keys are concatenated onto it, and a beam reorder copies it all."""

    def __init__(self, runner, cache, memory_valid, mask_positions, copies, capacity):
        index = paddle.to_tensor(np.repeat(np.arange(len(mask_positions)), copies))
        self.cache = [(paddle.index_select(k, index), paddle.index_select(v, index)) for k, v in cache]
        self.memory_valid = np.repeat(memory_valid, copies, axis=0)
        self.mask_positions = np.repeat(mask_positions, copies)
        self.runner, self.copies, self.generated = runner, copies, 0

    def step(self, tokens):
        self.generated += 1
        position_ids = np.stack([self.mask_positions, np.full_like(self.mask_positions, self.generated + 1)], axis=1)
        valid = np.ones((len(tokens), 1), dtype=bool)
        self.cache, self.memory_valid, logprobs = self.runner.extend(
            self.cache, self.memory_valid, tokens[:, None], position_ids[:, :, None], valid, 0, True
        )
        return logprobs

    def select(self, rows, keep_sources):
        rows = rows.reshape(-1, self.copies)[keep_sources].reshape(-1)
        index = paddle.to_tensor(rows)
        self.cache = [(paddle.index_select(k, index), paddle.index_select(v, index)) for k, v in self.cache]
        self.memory_valid, self.mask_positions = self.memory_valid[rows], self.mask_positions[rows]


class ConcatCacheRunner(ModelRunner):
    def start_rows(self, cache, memory_valid, mask_positions, copies, capacity):
        return ConcatCacheRows(self, cache, memory_valid, mask_positions, copies, capacity)


@pytest.mark.parametrize(
    "config",
    [
        GenerationConfig(num_beams=4, tgt_length=10, length_penalty=0.7, no_repeat_ngram_size=2, min_tgt_length=1,
                         num_return_sequences=4),
        GenerationConfig(decode_strategy="sampling", tgt_length=10, top_k=5, seed=3, num_return_sequences=3),
    ],
    ids=["beam_search", "sampling"],
)
def test_shared_memory_cache_gives_the_same_answers_as_per_row_copies(config, monkeypatch):
    # A large init makes answers depend on the source, and a pull towards the end makes sources finish at
    # different steps and leave the batch mid-blank.
    model = biased(model_with_seed(7, initializer_range=0.3), {IDS.eop: 2.0})
    sources = [
        [IDS.cls, 5, IDS.mask, 6, 7, IDS.smask, 8, 9, 10, IDS.gmask, IDS.eos],  # three blanks, longest
        [IDS.cls, 11, 12, IDS.mask, 13, IDS.eos],  # one blank
        [IDS.cls, 14, IDS.smask, 15, 16, 17, IDS.mask, IDS.eos],  # two blanks
    ]
    dropped = []
    original_select = DecodingRows.select

    def recording_select(self, order, keep):
        dropped.append(int((~keep).sum()))
        original_select(self, order, keep)

    monkeypatch.setattr(DecodingRows, "select", recording_select)
    new = GLMGenerator(model, IDS).generate(sources, config)
    old = GLMGenerator(model, IDS, runner=ConcatCacheRunner(model)).generate(sources, config)
    assert [len(blanks) for blanks in new] == [3, 1, 2]
    assert new == old
    assert sum(dropped) > 0  # finished sources did leave the batch
    assert len({len(answer) for blanks in new for answers in blanks for answer in answers}) > 2


@pytest.mark.parametrize("width", [300, 250240], ids=["sorted-whole", "sampled-bound"])
def test_top_k_indices_equals_a_stable_sort(width):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((4, width)).astype("float32")
    scores[:, rng.integers(0, width, width // 10)] = -np.inf  # banned tokens
    scores[1, :] = np.round(scores[1, :], 1)  # many equal scores: ties go to the lower index
    scores[2, 7] = scores[2, 9] = scores[2].max() + 1.0  # a tie at the top
    scores[3, : width // 2] = -np.inf  # half a row banned
    expected = np.argsort(-scores, axis=-1, kind="stable")[:, :15]
    np.testing.assert_array_equal(top_k_indices(scores, 15), expected)


def test_decoding_leaves_no_python_objects_behind():
    """A long-running server decodes forever: a generate call must not leave objects behind (Paddle 3.3.1's
    to_tensor and Tensor constructor each leak one per call; decoding feeds its steps through paddle.assign)."""
    import gc

    generator = GLMGenerator(model_with_seed(3), IDS)
    config = GenerationConfig(decode_strategy="beam_search", num_beams=3, tgt_length=12, min_tgt_length=12)
    sources = [source(5, 6, 7), source(8, 9, blank=IDS.mask) + [10, IDS.smask]]

    def objects_after(calls):
        for _ in range(calls):
            generator.generate(sources, config)
        gc.collect()
        return len(gc.get_objects())

    objects_after(2)  # warm-up: caches, kernels
    before = objects_after(0)
    assert objects_after(5) - before < 20  # before: 405 more objects after these 5 calls


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_bans_exactly_the_tokens_a_slow_scan_finds(n):
    rng = np.random.default_rng(n)
    generated = rng.integers(0, 4, (6, 15))  # few distinct tokens: many repeats
    config = GenerationConfig(no_repeat_ngram_size=n)
    for step in range(generated.shape[1] + 1):
        scores = process_scores(np.zeros((6, 8), dtype="float32"), generated[:, :step], step, config,
                                np.array([7]), [])
        for row in range(6):
            tokens = list(generated[row, :step])
            banned = {tokens[s + n - 1] for s in range(step - n + 1) if step >= n and tokens[s : s + n - 1] == tokens[step - n + 1 :]}
            assert set(np.flatnonzero(scores[row] == -np.inf)) == banned


def test_extend_many_equals_each_extend_alone_and_its_padded_caches_decode_the_same():
    """ModelRunner.extend_many (the engine's one forward for several sources' encodes, <|startofpiece|> or answers
    put into memory): each call's log-probabilities as its own extend gives them, and the padded cache it returns
    continues exactly as the unpadded one."""
    runner = ModelRunner(model_with_seed(7, initializer_range=0.3))
    sources = [source(5), source(6, 7, 8, 9), source(10, 11)]
    encoded = [runner.encode([ids], IDS.pad) for ids in sources]
    sop = lambda ids, answer: (np.array([[IDS.sop, *answer]]), np.array([[[len(ids) - 2] * (1 + len(answer)),
                                                                          list(range(1, 2 + len(answer)))]]))  # noqa: E731
    calls = []
    for ids, (cache, valid), answer in zip(sources, encoded, ([], [20, 21, 22], [23])):
        tokens, positions = sop(ids, answer)
        calls.append((cache, valid, tokens, positions, np.ones(tokens.shape, dtype=bool), 0, True))
    together = runner.extend_many(calls, IDS.pad)
    alone = [runner.extend(*call) for call in calls]
    for (cache, valid, logprobs), (alone_cache, alone_valid, alone_logprobs), ids in zip(together, alone, sources):
        np.testing.assert_allclose(logprobs, alone_logprobs, atol=1e-5)
        assert valid.sum() == alone_valid.sum()  # the padding is marked invalid
        step = (np.array([[30]]), np.array([[[len(ids) - 2], [5]]]), np.ones((1, 1), dtype=bool), 0, True)
        np.testing.assert_allclose(runner.extend(cache, valid, *step)[2], runner.extend(alone_cache, alone_valid, *step)[2], atol=1e-5)
    encodes = runner.extend_many([(None, np.zeros((1, 0), dtype=bool), np.array([ids]),
                                   np.array([[list(range(len(ids))), [0] * len(ids)]]), np.ones((1, len(ids)), dtype=bool),
                                   len(ids), True) for ids in sources], IDS.pad)  # fmt: skip
    for (_, _, logprobs), ids in zip(encodes, sources):
        alone_logprobs = runner.extend(None, np.zeros((1, 0), dtype=bool), np.array([ids]), np.array([[list(range(len(ids))), [0] * len(ids)]]),
                                       np.ones((1, len(ids)), dtype=bool), len(ids), True)[2]  # fmt: skip
        np.testing.assert_allclose(logprobs, alone_logprobs, atol=1e-5)


def test_encoding_with_the_first_start_of_piece_equals_the_full_forward_and_the_separate_pass():
    """ModelRunner.encode(start=...) puts the first blank's <|startofpiece|> through the sources' own pass: its
    log-probabilities are the full uncached forward's (the oracle) in a left-padded batch, and the memory
    without its last column is the plain encode's."""
    model = model_with_seed(5, initializer_range=0.3)
    runner = ModelRunner(model)
    sources = [source(5, 6, 7, 8), [IDS.cls, 9, IDS.mask, 10, IDS.eos]]
    first = np.array([src.index(next(t for t in src if t in IDS.mask_ids)) for src in sources])
    cache, valid, logprobs = runner.encode(sources, IDS.pad, start=(IDS.sop, first))
    for row, src in enumerate(sources):
        np.testing.assert_allclose(logprobs[row], next_token_logprobs(model, src, [[]]), atol=1e-5)
    plain_cache, plain_valid = runner.encode(sources, IDS.pad)
    memory_cache, memory_valid = without_last_column(cache, valid)
    assert np.array_equal(memory_valid, plain_valid) and valid[:, -1].all()
    for (keys, values), (plain_keys, plain_values) in zip(memory_cache, plain_cache):
        np.testing.assert_allclose(keys.numpy(), plain_keys.numpy(), atol=1e-5)
        np.testing.assert_allclose(values.numpy(), plain_values.numpy(), atol=1e-5)


def test_id_runs():
    assert id_runs([9, 3, 4, 5, 11, 10, 4]) == [(3, 6), (9, 12)]
    assert id_runs([]) == []

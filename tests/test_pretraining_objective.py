"""The blank-infilling objective against THUDM's definition (GLM_RECIPE.md "Pretraining"), on synthetic
windows: every example is a faithful corruption of its window, spans never overlap, the mixture, span
lengths and masked shares follow the flags, sentences end at sentence ends, and the model's sep mask
makes Part A bidirectional and Part B causal."""

import math
import random

import numpy as np
import paddle
import pytest
from conftest import tiny_config_kwargs

import glm
from glm.inputs import IGNORE_INDEX, collate_examples
from glm.pretraining.objective import (
    MAX_BLOCK_LENGTH,
    BlankInfillingBuilder,
    PretrainingArguments,
    span_length_distribution,
)
from glm.tokenization import GLMSpecialIds

# A 96-token vocabulary: words 0..79, sentence ends 80..84, GLM's special tokens above.
IDS = GLMSpecialIds(cls=88, eos=89, sop=90, eop=91, mask=92, smask=93, gmask=94)
SENTENCE_ENDS = range(80, 85)
SENTENCE_END = np.zeros(96, dtype=bool)
SENTENCE_END[list(SENTENCE_ENDS)] = True
MASK_OF = {"token": IDS.mask, "sentence": IDS.smask, "document": IDS.gmask}


def document(rng, length):
    """Words with a sentence end every 5 to 30 tokens, ending at one."""
    tokens = []
    while len(tokens) < length:
        tokens += rng.integers(0, 80, size=int(rng.integers(4, 30))).tolist() + [int(rng.integers(80, 85))]
    return tokens


def window(rng, length=512, documents=1):
    """[CLS] doc <|endoftext|> [CLS] doc ...: `documents` documents cut to `length` tokens."""
    tokens = []
    for _ in range(documents):
        tokens += [IDS.cls] + document(rng, length // documents) + [IDS.eos]
    return np.array(tokens[:length], dtype=np.int64)


def builder(**flags):
    return BlankInfillingBuilder(PretrainingArguments(**flags), IDS, SENTENCE_END)


def blocks_of(example, special=IDS):
    """Part B as (mask position, input tokens, labels, block positions, loss mask, positions) per block."""
    sep, ids = example.sep, example.input_ids
    starts = [i for i in range(sep, len(ids)) if ids[i] == special.sop]
    result = []
    for number, start in enumerate(starts):
        end = starts[number + 1] if number + 1 < len(starts) else len(ids)
        result.append((example.position_ids[0][start], ids[start:end], example.labels[start:end],
                       example.position_ids[1][start:end], example.loss_mask[start:end], example.position_ids[0][start:end]))
    return result


def restored(example, special=IDS):
    """The window rebuilt from the example: each Part B span put back at its mask in Part A."""
    spans = {}
    for mask_position, tokens, labels, _, _, _ in blocks_of(example, special):
        suffix = example.input_ids[mask_position] == special.gmask and labels[-1] != special.eop
        spans[mask_position] = labels if suffix else labels[:-1]
    text = []
    for position, token in enumerate(example.input_ids[: example.sep]):
        text += spans.pop(position) if position in spans else [token]
    assert not spans, "a block points at no mask of Part A"
    return text


def check_structure(example):
    """The positions, labels, loss mask and sep of THUDM's make_block_data (or the suffix form)."""
    sep, ids = example.sep, example.input_ids
    mask = MASK_OF[example.objective]
    assert ids[0] == IDS.cls and len(example.labels) == len(ids) == len(example.loss_mask)
    assert example.position_ids[0][:sep] == list(range(sep)) and example.position_ids[1][:sep] == [0] * sep
    assert example.labels[:sep] == [IGNORE_INDEX] * sep and example.loss_mask[:sep] == [0] * sep
    masks = [i for i in range(sep) if ids[i] in (IDS.mask, IDS.smask, IDS.gmask)]
    assert all(ids[i] == mask for i in masks)
    blocks = blocks_of(example)
    assert sorted(block[0] for block in blocks) == masks and blocks[0][1][0] == IDS.sop and ids[sep] == IDS.sop
    for mask_position, tokens, labels, block_positions, loss_mask, positions in blocks:
        n = len(tokens)
        assert positions == [mask_position] * n  # position_ids[0]: the mask's position in Part A
        assert block_positions == list(range(1, n + 1))  # position_ids[1]: 1..len+1
        assert tokens[1:] == labels[:-1]  # labels are the block's tokens one to the right
        assert IDS.sop not in labels
        if labels[-1] == IDS.eop:
            assert loss_mask == [1] * n and IDS.eos not in labels and IDS.cls not in labels  # within a document
        else:
            # The suffix form: one block, the window's end, no <|endofpiece|>. As THUDM, its target runs on
            # across documents (<|endoftext|> is predicted; a later document's [CLS] is not scored).
            assert example.objective == "document" and len(blocks) == 1 and mask_position == sep - 1
            assert loss_mask == [int(label != IDS.cls) for label in labels]


@pytest.mark.parametrize("objective", ["token", "sentence", "document"])
@pytest.mark.parametrize("documents", [1, 3])
def test_every_example_is_a_faithful_corruption_of_its_window(objective, documents):
    rng, build = np.random.default_rng(0), builder()
    for _ in range(40):
        windows = [window(rng, 256, documents) for _ in range(3)]
        examples = build.build(windows, objective, rng)
        assert len(examples) == 3
        for example, source in zip(examples, windows):
            assert example.objective == objective and example.window == source.tolist()
            check_structure(example)
            assert restored(example) == source.tolist()


def token_spans(example):
    """The window spans [start, end) of a token/sentence example, from its Part A and blocks."""
    lengths = {mask: len(labels) - 1 for mask, _, labels, _, _, _ in blocks_of(example)}
    spans, shift = [], 0
    for position in range(example.sep):
        if position in lengths:
            spans.append((position + shift, position + shift + lengths[position]))
            shift += lengths[position] - 1
    return spans


def test_token_spans_never_overlap_touch_or_cover_a_document_boundary():
    rng, build = np.random.default_rng(1), builder()
    for _ in range(200):
        source = window(rng, int(rng.integers(64, 512)), int(rng.integers(1, 4)))
        example = build.token_example(source, rng)
        if example is None:
            continue
        spans = token_spans(example)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end < start  # at least one token between neighbouring spans
        for start, end in spans:
            assert 1 <= end - start <= MAX_BLOCK_LENGTH - 1
            assert not np.isin(source[start:end], [IDS.cls, IDS.eos]).any()
            assert end < len(source)  # the window's last token stays (THUDM)


def truncated_poisson_mean(average):
    weights = [average**k / math.factorial(k) for k in range(1, MAX_BLOCK_LENGTH)]
    return sum(k * w for k, w in zip(range(1, MAX_BLOCK_LENGTH), weights)) / sum(weights)


def slow_span_draws(average, target, seed, windows):
    """The recipe read literally, with Python's random: Poisson lengths over 1..39 drawn until they cover
    `target` tokens; the mean length of everything drawn."""
    rng = random.Random(seed)
    weights = [average**k / math.factorial(k) for k in range(1, MAX_BLOCK_LENGTH)]
    drawn = []
    for _ in range(windows):
        total = 0
        while total < target:
            drawn.append(rng.choices(range(1, MAX_BLOCK_LENGTH), weights=weights)[0])
            total += drawn[-1]
    return float(np.mean(drawn))


@pytest.mark.parametrize("average", [3.0, 6.0])
def test_token_span_lengths_and_masked_share_follow_the_flags(average):
    rng, build = np.random.default_rng(2), builder(avg_block_length=average)
    lengths, shares = [], []
    for _ in range(400):
        source = window(rng, 512)
        example = build.token_example(source, rng)
        covered = sum(end - start for start, end in token_spans(example))
        target = int(0.15 * len(source))
        assert target <= covered < target + MAX_BLOCK_LENGTH - 1  # drawn until covered, and no further
        lengths += [end - start for start, end in token_spans(example)]
        shares.append(covered / len(source))
    assert np.mean(lengths) == pytest.approx(slow_span_draws(average, int(0.15 * 512), 0, 2000), abs=0.08)
    assert np.mean(lengths) == pytest.approx(truncated_poisson_mean(average), rel=0.06)
    assert 0.15 <= np.mean(shares) <= 0.15 + average / 512 + 0.005


def test_the_span_length_distribution_is_poisson_over_1_to_39():
    p = span_length_distribution(3.0)
    poisson = np.array([3.0**k * math.exp(-3.0) / math.factorial(k) for k in range(1, 40)])
    np.testing.assert_allclose(p, poisson / poisson.sum(), rtol=1e-9)


def test_sentence_spans_are_whole_sentences_covering_the_ratio():
    rng, build = np.random.default_rng(3), builder()
    shares = []
    for _ in range(300):
        source = window(rng, int(rng.integers(128, 512)), int(rng.integers(1, 3)))
        example = build.sentence_example(source, rng)
        spans = token_spans(example)
        for start, end in spans:
            assert SENTENCE_END[source[end - 1]]  # ends at a sentence end
            assert source[start - 1] in (IDS.cls, IDS.eos) or SENTENCE_END[source[start - 1]]  # starts a sentence
            assert not SENTENCE_END[source[start : end - 1]].any()  # one sentence, not several
            assert not np.isin(source[start:end], [IDS.cls, IDS.eos]).any()
        covered, target = sum(end - start for start, end in spans), int(0.15 * len(source))
        longest = max(end - start for start, end in spans)
        assert covered >= target and covered - longest < target  # taken until covered, then no more
        shares.append(covered / len(source))
    assert 0.15 <= np.mean(shares) <= 0.25


def test_document_spans_are_at_least_gpt_min_ratio_of_the_window_in_both_forms():
    rng, build = np.random.default_rng(4), builder()
    forms = {"suffix": 0, "infill": 0}
    for _ in range(300):
        windows = [window(rng, int(rng.integers(200, 256)), documents=1) for _ in range(4)]
        shortest = min(map(len, windows))
        examples = build.document_examples(windows, rng)
        lengths = []
        for example, source in zip(examples, windows):
            (_, _, labels, _, _, _), = blocks_of(example)
            suffix = labels[-1] != IDS.eop
            forms["suffix" if suffix else "infill"] += 1
            span = len(labels) - (0 if suffix else 1)
            assert int(0.25 * shortest) <= span <= len(source) - 2
            lengths.append((span, len(source)))
        drawn = max(span for span, _ in lengths)  # one generation length per batch, cut to each window
        assert all(span == min(drawn, size - 2) for span, size in lengths)
    assert forms["suffix"] == pytest.approx(forms["infill"], rel=0.15)  # THUDM's gpt_infill_prob 0.5
    several = [window(rng, 256, documents=3)]
    (example,) = build.document_examples(several, rng)
    assert blocks_of(example)[0][2][-1] != IDS.eop  # a window spanning documents: the suffix form


def test_one_objective_per_batch_in_the_flags_mixture():
    rng = np.random.default_rng(5)
    windows = [window(rng, 128) for _ in range(2)]
    for flags, expected in (({}, (0.4, 0.3, 0.3)), ({"bert_prob": 0.1, "gap_sentence_prob": 0.7}, (0.1, 0.7, 0.2))):
        build, counts = builder(short_seq_prob=0.0, **flags), {"token": 0, "sentence": 0, "document": 0}
        for _ in range(3000):
            objectives = {example.objective for example in build.build_batch(windows, rng)}
            assert len(objectives) == 1
            counts[objectives.pop()] += 1
        assert [counts[o] / 3000 for o in ("token", "sentence", "document")] == pytest.approx(expected, abs=0.03)


def test_short_seq_prob_cuts_a_batch_into_pieces_at_sentence_ends():
    rng, build = np.random.default_rng(6), builder(seq_length=512, short_seq_prob=1.0)
    for _ in range(50):
        windows = [window(rng, 512) for _ in range(2)]
        examples = build.build_batch(windows, rng)
        assert len(examples) >= 2 * 1 and all(len(e.window) < 512 for e in examples)
        for example in examples:
            piece = example.window
            assert piece[0] == IDS.cls and IDS.cls not in piece[1:] and len(piece) >= 17
            assert restored(example) == piece


def test_the_same_draw_gives_the_same_examples():
    windows = [window(np.random.default_rng(7), 256) for _ in range(4)]
    first = builder().build_batch(windows, np.random.default_rng([1, 2]))
    again = builder().build_batch(windows, np.random.default_rng([1, 2]))
    other = builder().build_batch(windows, np.random.default_rng([1, 3]))
    assert [e.record() for e in first] == [e.record() for e in again]
    assert [e.record() for e in first] != [e.record() for e in other]


@pytest.mark.parametrize(
    "flags, problem",
    [({"bert_prob": 1.2}, "--bert_prob must be between 0 and 1"),
     ({"bert_ratio": -0.1}, "--bert_ratio must be between 0 and 1"),
     ({"bert_prob": 0.6, "gap_sentence_prob": 0.5}, "exceed 1"),
     ({"avg_block_length": 0}, "--avg_block_length must be above 0"),
     ({"seq_length": 20}, "--seq_length must be at least 34")],
)  # fmt: skip
def test_bad_objective_flags_are_named(flags, problem):
    assert problem in PretrainingArguments(**flags).problem()
    assert PretrainingArguments().problem() is None


def test_the_sep_mask_makes_part_a_bidirectional_and_part_b_causal():
    """On a built example the model's Part A states ignore Part B, and a Part B state ignores later Part B
    tokens but not Part A: what THUDM's attention_mask = sep means."""
    paddle.seed(3)
    model = glm.GLMForConditionalGeneration(glm.GLMConfig(**tiny_config_kwargs(max_sequence_length=128)))
    model.eval()
    rng = np.random.default_rng(8)
    (example,) = builder().build([window(rng, 96, 2)], "token", rng)
    sep, length = example.sep, len(example.input_ids)

    def hidden(input_ids):
        batch = collate_examples([dict(example.features(), input_ids=input_ids)], IDS.eos)
        inputs = {k: paddle.to_tensor(v) for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}
        return model.glm(**inputs, return_dict=False)[0].numpy()[0]

    base = hidden(example.input_ids)
    changed_b = hidden(example.input_ids[:sep] + [(t + 1) % 80 for t in example.input_ids[sep:]])
    np.testing.assert_allclose(base[:sep], changed_b[:sep], atol=1e-6)  # Part A never sees Part B
    last = sep + (length - sep) // 2
    changed_tail = hidden(example.input_ids[:last] + [(t + 1) % 80 for t in example.input_ids[last:]])
    np.testing.assert_allclose(base[:last], changed_tail[:last], atol=1e-6)  # Part B is causal
    changed_a = hidden([example.input_ids[0], (example.input_ids[1] + 1) % 80] + example.input_ids[2:])
    assert np.abs(base[1] - changed_a[1]).max() > 1e-4 and np.abs(base[-1] - changed_a[-1]).max() > 1e-4
    assert np.abs(base[0] - changed_a[0]).max() > 1e-4  # bidirectional: position 0 sees position 1

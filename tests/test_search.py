"""glm.search.advance_searches, the server's one search call per step: several searches of different
strategies, widths, settings and lengths advanced together choose exactly what each chooses alone."""

import numpy as np
import pytest

from glm.generation import GenerationConfig
from glm.search import BeamSearch, Move, advance_searches, beam_candidates, id_runs, make_search, process_scores, sample_tokens

VOCAB, STOP_IDS, PAD = 40, np.array([38, 39]), 0
BANNED = id_runs([30, 31, 32])
CONFIGS = [
    GenerationConfig(decode_strategy="greedy_search", tgt_length=9, min_tgt_length=3),
    GenerationConfig(decode_strategy="greedy_search", tgt_length=6, no_repeat_ngram_size=2),
    GenerationConfig(decode_strategy="sampling", tgt_length=9, top_k=5, top_p=0.9, temperature=0.7, seed=3,
                     num_return_sequences=2),
    GenerationConfig(decode_strategy="sampling", tgt_length=7, seed=4, min_tgt_length=2),
    GenerationConfig(num_beams=3, tgt_length=9, length_penalty=0.7, no_repeat_ngram_size=2),
    GenerationConfig(num_beams=3, tgt_length=5, num_return_sequences=2, min_tgt_length=1),  # shares the top-k
    GenerationConfig(num_beams=2, tgt_length=8, early_stopping=True),
    GenerationConfig(num_beams=2, tgt_length=8, select_topk=False, seed=5),  # samples its candidates
]


def searches(sources):
    made = []
    for config, count in zip(CONFIGS, sources):
        copies = config.num_beams if config.decode_strategy == "beam_search" else config.num_return_sequences
        made.append(make_search(config, count, copies, np.random.default_rng(config.seed), STOP_IDS, BANNED, PAD))
    return made


def step_logprobs(rng, rows):
    """Random log-probabilities with the stop ids likely, so searches end at different steps."""
    logits = rng.normal(size=(rows, VOCAB)).astype("float32") * 2
    logits[:, STOP_IDS] += rng.uniform(-1, 3, size=(rows, 1)).astype("float32")
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def advance_alone(search, logprobs):
    """The step of one search as the per-search loop did it before advance_searches: process_scores on its rows,
    then its own choice."""
    scores = process_scores(logprobs, search.generated[search.live_rows, : search.step], search.step, search.config,
                            STOP_IDS, BANNED)
    if isinstance(search, BeamSearch):
        flat = search.flat_scores(scores)
        return search.record(flat, beam_candidates(flat, search.candidate_count, search.config, search.rng))
    if search.config.decode_strategy == "greedy_search":
        return search.record(scores.argmax(axis=-1))
    return search.record(sample_tokens(scores, search.config, search.rng))


def moved_equal(a, b):
    if a is None or b is None:
        return a is None and b is None
    return all(np.array_equal(getattr(a, name), getattr(b, name)) for name in ("tokens", "rows", "keep"))


@pytest.mark.parametrize("sources", [[1] * len(CONFIGS), [2, 1, 3, 1, 2, 1, 3, 2]], ids=["one source each", "several"])
def test_searches_advanced_together_choose_what_each_chooses_alone(sources):
    together, alone = searches(sources), searches(sources)
    live = list(range(len(CONFIGS)))
    rng = np.random.default_rng(0)
    ended_at = {}
    for step in range(12):
        if not live:
            break
        parts = [step_logprobs(rng, len(together[i].live) * together[i].copies) for i in live]
        moves = advance_searches([together[i] for i in live], np.concatenate(parts))
        assert all(move is None or isinstance(move, Move) for move in moves)
        for i, part, move in zip(live, parts, moves):
            assert moved_equal(move, advance_alone(alone[i], part.copy()))
            if move is None:
                ended_at[i] = step
        live = [i for i, move in zip(live, moves) if move is not None]
    assert not live
    assert len(set(ended_at.values())) > 2  # the searches ended at different steps
    for joint, single in zip(together, alone):
        assert joint.answers() == single.answers()
        assert all(32 < token or token < 30 for source in joint.answers() for answer in source for token in answer)

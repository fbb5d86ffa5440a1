"""The search of a blank, in NumPy over [rows, vocab] log-probabilities: THUDM's logit processors, greedy
choice, sampling, beam search with its finished hypotheses.

A search object (SampleSearch for greedy search and sampling, BeamSearch) holds one blank's state for the
rows of its sources and does not run the model: `advance(logprobs)` takes its live rows' log-probabilities
and returns the Move that feeds the next step (tokens, the rows they continue, the sources that stay), or
None once it has ended; `answers()` then gives each source's answers. DecodingRows.decode (glm/model_runner.py)
alternates it with the model's steps for GLMGenerator; the server's engine advances the searches of all its
sources at once with `advance_searches`: every greedy and sampling row of every request through one set of
processors and one argmax, beam sources of one width and the same settings through one candidate selection.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Move", "SampleSearch", "BeamSearch", "make_search", "advance_searches", "BeamHypotheses", "id_runs",
           "ban_ids", "ban_repeated_ngrams", "process_scores", "top_k_indices", "beam_candidates", "choose_beams",
           "sample_tokens"]


class BeamHypotheses:
    """The finished hypotheses of one source (THUDM/HF BeamHypotheses): the `num_beams` best by
    length-penalised score, and whether the open beams can still beat them."""

    def __init__(self, num_beams: int, config):
        self.num_beams = num_beams
        self.config = config
        self.kept = []  # (score, tokens)

    def penalised(self, sum_logprobs: float, length: int) -> float:
        length = max(length, 1)  # an immediately ended answer would divide by 0**lp
        if self.config.length_penalty_form == "gnmt":
            return sum_logprobs / ((5.0 + length) / 6.0) ** self.config.length_penalty
        return sum_logprobs / length**self.config.length_penalty

    def add(self, tokens: List[int], sum_logprobs: float):
        score = self.penalised(sum_logprobs, len(tokens))
        if len(self.kept) < self.num_beams or score > self.worst():
            self.kept.append((score, tokens))
            self.kept.sort(key=lambda item: -item[0])
            del self.kept[self.num_beams :]

    def worst(self) -> float:
        return self.kept[-1][0]

    def is_done(self, best_open_sum_logprobs: float, generated: int) -> bool:
        if len(self.kept) < self.num_beams:
            return False
        if self.config.early_stopping:
            return True
        return self.worst() >= self.penalised(best_open_sum_logprobs, generated)



def id_runs(ids) -> List[Tuple[int, int]]:
    """Ids as runs of consecutive ids, [(start, end)]: banning the embedding rows above a tokenizer's vocabulary
    (49,000 ids for the tiny tokenizer on a 50048-row model) is then a slice, not a scatter of every id."""
    ids = np.unique(np.asarray(ids, dtype="int64"))
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(ids, breaks) if run.size]


def ban_ids(scores, banned_ids):
    """Banned ids (as `id_runs`) never chosen: -inf in every row of `scores` [rows, vocab], in place."""
    for start, end in banned_ids:
        scores[:, start:end] = -np.inf


def ban_repeated_ngrams(scores, generated, step, n):
    """No-repeat-ngram on `scores` [rows, vocab] in place: an n-gram whose first n - 1 tokens equal the last
    n - 1 generated bans its last token. `generated` [rows, step] holds every row's tokens so far."""
    if n <= 0 or step < n:
        return
    # Windows start at 0 .. step - n; compared as n - 1 shifted slices (sliding_window_view took half the
    # step's search).
    starts = step - n + 1
    repeats = np.ones((generated.shape[0], starts), dtype=bool)
    for j in range(n - 1):
        repeats &= generated[:, j : j + starts] == generated[:, starts + j, None]
    row, start = np.nonzero(repeats)
    scores[row, generated[row, start + n - 1]] = -np.inf


def process_scores(scores, generated, step, config, stop_ids, banned_ids):
    """THUDM's logit processors on log-probabilities [rows, vocab], in place, vectorised over rows: banned ids
    (as `id_runs`), min length (the stop ids until `min_tgt_length` tokens exist), no-repeat-ngram.
    `generated` [rows, step] holds every row's tokens so far (read only with no_repeat_ngram_size). Returns
    `scores`."""
    ban_ids(scores, banned_ids)
    if step < config.min_tgt_length:
        scores[:, stop_ids] = -np.inf
    ban_repeated_ngrams(scores, generated, step, config.no_repeat_ngram_size)
    return scores


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices [rows, k] of the k largest scores of each row, best first, equal scores by column.

    Exact, and fast when few scores come near the top (np.argpartition over the 5 x 50048 scores of a
    source took ~10 ms a step): the k-th largest of an evenly spaced sample of a row is a lower bound on
    the row's k-th largest, so only the scores reaching it (about 1/256 of the row) are sorted."""
    rows, width = scores.shape
    stride = width // (256 * k)
    if stride >= 4:
        bound = -np.partition(-scores[:, ::stride], k - 1, axis=-1)[:, k - 1]
        row, column = np.nonzero(scores >= bound[:, None])
        if np.bincount(row, minlength=rows).min() >= k:  # always, unless NaNs hide the sample's best
            order = np.lexsort((column, -scores[row, column], row))  # by row, then score, then column
            starts = np.searchsorted(row[order], np.arange(rows))
            return column[order][starts[:, None] + np.arange(k)]
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def beam_candidates(flat, count, config, rng):
    """The `count` candidates of each source, flat indices beam * vocab + token into `flat` [sources,
    beams * vocab] (log-probabilities plus running beam scores), best first: by top-k (`select_topk`,
    THUDM's --select-topk) or sampled without replacement in proportion to their probabilities."""
    if config.select_topk:
        return top_k_indices(flat, count)
    probs = np.exp(flat.astype("float64") - flat.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    top = np.stack([rng.choice(flat.shape[-1], size=count, replace=False, p=row) for row in probs])
    order = np.argsort(-np.take_along_axis(flat, top, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(top, order, axis=-1)


def choose_beams(candidates, flat, vocab, num_beams, stop_ids, finish):
    """THUDM's step for one source. Walking `candidates` (flat indices into `flat`, its scores, best first):
    a stop token ranked within the beam width ends that beam as a hypothesis (`finish(beam, score)`), a
    stop ranked lower is dropped, and the first `num_beams` other candidates continue. Returns the
    continuations' (scores, tokens, beams), each [num_beams]; `candidates` must hold enough non-stops."""
    scores = np.zeros(num_beams, dtype="float32")
    tokens = np.zeros(num_beams, dtype="int64")
    beams = np.arange(num_beams)
    chosen = 0
    for rank, index in enumerate(candidates):
        beam, token, score = index // vocab, index % vocab, flat[index]
        if token in stop_ids:
            if rank < num_beams:  # an end ranked below the beam width is not a hypothesis
                finish(beam, float(score))
            continue
        scores[chosen], tokens[chosen], beams[chosen] = score, token, beam
        chosen += 1
        if chosen == num_beams:
            break
    return scores, tokens, beams


def sample_tokens(scores, config, rng):
    """One token per row sampled from log-probabilities [rows, vocab]: temperature, then top-k, then top-p."""
    scores = scores.astype("float64") / config.temperature
    if config.top_k > 0:
        kth = -np.partition(-scores, config.top_k - 1, axis=-1)[:, config.top_k - 1 : config.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if 0 < config.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the first token)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= config.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


@dataclass
class Move:
    """What a search feeds the next step: row i continues live row `rows[i]` of its own source (a beam
    reorder; identity otherwise), sources where `keep` is False leave, and `tokens` are the kept rows' next
    tokens, in order."""

    tokens: np.ndarray
    rows: np.ndarray
    keep: np.ndarray


class _Search:
    """What every search has: `copies` rows per source, `live` the sources still decoding (in the order of their
    rows), `step` the tokens chosen so far."""

    copies: int
    live: np.ndarray
    step: int

    @property
    def live_rows(self) -> np.ndarray:
        return (self.live[:, None] * self.copies + np.arange(self.copies)).reshape(-1)

    def advance(self, logprobs: np.ndarray) -> Optional[Move]:
        """The next step's Move from the live rows' log-probabilities [rows, vocab] (modified in place), or None
        once the search has ended."""
        return advance_searches([self], logprobs)[0]


class SampleSearch(_Search):
    """Greedy search or sampling of one blank over `sources` x `copies` rows (the sampled answers of a source;
    greedy: one). A row ends at a stop token; a source leaves when all its rows ended."""

    def __init__(self, sources: int, copies: int, config, rng, stop_ids, banned_ids, pad: int):
        self.config, self.rng, self.copies, self.pad = config, rng, copies, pad
        self.stop_ids, self.banned_ids = stop_ids, banned_ids
        self.generated = np.full((sources * copies, config.tgt_length), pad, dtype="int64")
        self.lengths = np.zeros(sources * copies, dtype="int64")
        self.finished = np.zeros(sources * copies, dtype=bool)
        self.live = np.arange(sources)  # the sources still decoding, in the order of their rows
        self.step = 0

    def record(self, tokens: np.ndarray) -> Optional[Move]:
        """Takes the tokens chosen for the live rows; the next step's Move, or None when every row ended."""
        live_rows = self.live_rows
        going = ~self.finished[live_rows]
        self.finished[live_rows] |= (tokens[:, None] == self.stop_ids).any(axis=1)  # np.isin: 10x slower here
        writing = going & ~self.finished[live_rows]
        self.generated[live_rows[writing], self.step] = tokens[writing]
        self.lengths[live_rows[writing]] += 1
        self.step += 1
        if self.finished.all() or self.step == self.config.tgt_length:
            return None
        keep = ~self.finished[live_rows].reshape(-1, self.copies).all(axis=1)  # a source goes when all its copies end
        tokens = np.where(self.finished[live_rows], self.pad, tokens).astype("int64")
        self.live = self.live[keep]
        return Move(tokens.reshape(-1, self.copies)[keep].reshape(-1), np.arange(len(live_rows)), keep)

    def answers(self) -> List[List[List[int]]]:
        answers = [self.generated[row, : self.lengths[row]].tolist() for row in range(len(self.lengths))]
        return [answers[b : b + self.copies] for b in range(0, len(answers), self.copies)]


class BeamSearch(_Search):
    """THUDM's beam search of one blank over `sources` x `beams` rows: per step the best continuations of each
    source's beams, a stop ranked within the beam width ending that beam as a hypothesis (BeamHypotheses); a
    source leaves when its hypotheses cannot be beaten."""

    def __init__(self, sources: int, beams: int, config, rng, stop_ids, banned_ids, pad: int):
        self.config, self.rng, self.copies = config, rng, beams
        self.stop_ids, self.banned_ids = stop_ids, banned_ids
        self.hypotheses = [BeamHypotheses(beams, config) for _ in range(sources)]
        self.done = np.zeros(sources, dtype=bool)
        self.beam_scores = np.zeros((sources, beams), dtype="float32")
        self.beam_scores[:, 1:] = -1e9  # all beams start equal: only beam 0 may propose at the first step
        self.generated = np.full((sources * beams, config.tgt_length), pad, dtype="int64")
        self.live = np.arange(sources)  # the sources still searching, in the order of their rows
        self.step = 0

    @property
    def candidate_count(self) -> int:
        # THUDM takes 2 x beams candidates for its one end token; with two stop ids, 3 x beams guarantees
        # num_beams continuations even if every beam's best tokens are stops.
        return (1 + len(self.stop_ids)) * self.copies

    def flat_scores(self, scores: np.ndarray) -> np.ndarray:
        """Processed log-probabilities plus the running beam scores, [live sources, beams * vocab]."""
        return (scores + self.beam_scores[self.live].reshape(-1, 1)).reshape(len(self.live), -1)

    def record(self, flat: np.ndarray, candidates: np.ndarray) -> Optional[Move]:
        """Takes each live source's candidates (flat indices into `flat`, best first); the next step's Move, or
        None when every source is done."""
        live, beams, step = self.live, self.copies, self.step
        vocab = flat.shape[-1] // beams
        next_scores = np.zeros((len(live), beams), dtype="float32")
        next_tokens = np.zeros((len(live), beams), dtype="int64")
        next_beams = np.zeros((len(live), beams), dtype="int64")  # the beam of its source each continues
        for i, b in enumerate(live):

            def finish(beam, score, b=b):
                self.hypotheses[b].add(self.generated[b * beams + beam, :step].tolist(), score)

            next_scores[i], next_tokens[i], next_beams[i] = choose_beams(candidates[i], flat[i], vocab, beams,
                                                                         self.stop_ids, finish)
            self.done[b] = self.hypotheses[b].is_done(float(flat[i, candidates[i, 0]]), step)
        live_rows = self.live_rows
        self.generated[live_rows] = self.generated[(live[:, None] * beams + next_beams).reshape(-1)]
        self.generated[live_rows, step] = next_tokens.reshape(-1)
        self.beam_scores[live] = next_scores
        self.step += 1
        if self.done.all() or self.step == self.config.tgt_length:
            return None
        keep = ~self.done[live]  # finished sources leave the batch
        self.live = live[keep]
        return Move(next_tokens[keep].reshape(-1), (np.arange(len(live))[:, None] * beams + next_beams).reshape(-1), keep)

    def answers(self) -> List[List[List[int]]]:
        results = []
        for b, hypotheses in enumerate(self.hypotheses):
            if not self.done[b]:  # out of length: the open beams compete with the finished ones
                for row in range(b * self.copies, (b + 1) * self.copies):
                    hypotheses.add(self.generated[row].tolist(), float(self.beam_scores.reshape(-1)[row]))
            results.append([tokens for _, tokens in hypotheses.kept[: self.config.num_return_sequences]])
        return results


def make_search(config, sources: int, copies: int, rng, stop_ids, banned_ids, pad: int):
    """The search `config.decode_strategy` names, over `sources` x `copies` rows."""
    kind = BeamSearch if config.decode_strategy == "beam_search" else SampleSearch
    return kind(sources, copies, config, rng, stop_ids, banned_ids, pad)


def _process_together(searches, scores: np.ndarray, bounds: np.ndarray):
    """process_scores on the stacked live rows of `searches` (search i's rows are scores[bounds[i]:bounds[i+1]]).
    The banned ids, a slice of most of the vocabulary on every row, as one operation over all rows when the
    searches share them (one generator's); min length and n-gram bans per search (its own length and tokens)."""
    shared = all(search.banned_ids is searches[0].banned_ids for search in searches)
    if shared:
        ban_ids(scores, searches[0].banned_ids)
    for search, start, end in zip(searches, bounds[:-1], bounds[1:]):
        # only the n-gram ban reads the tokens so far: not gathered for the searches without one
        generated = search.generated[search.live_rows, : search.step] if search.config.no_repeat_ngram_size else None
        process_scores(scores[start:end], generated, search.step, search.config, search.stop_ids,
                       () if shared else search.banned_ids)


def advance_searches(searches: Sequence, logprobs: np.ndarray) -> List[Optional[Move]]:
    """One step of several searches (SampleSearch and BeamSearch, each of its own sources and settings) whose
    live rows' log-probabilities are stacked in `logprobs` [rows, vocab] in the order of `searches` (modified
    in place). Each search gets exactly what it would alone: the processors are row-wise, greedy rows take one
    argmax over all rows, sampling draws from each search's own generator in its row order, and beam sources
    of the same width and candidate rule share one top-k over their flat scores. Returns each search's Move
    (None: it ended)."""
    bounds = np.cumsum([0] + [len(search.live) * search.copies for search in searches])
    _process_together(searches, logprobs, bounds)
    moves: List[Optional[Move]] = [None] * len(searches)
    greedy = None
    beam_groups = {}  # (beams, candidates) -> indices of beam searches choosing by top-k
    for index, (search, start, end) in enumerate(zip(searches, bounds[:-1], bounds[1:])):
        scores = logprobs[start:end]
        if isinstance(search, BeamSearch):
            if search.config.select_topk:
                beam_groups.setdefault((search.copies, search.candidate_count), []).append(index)
            else:
                flat = search.flat_scores(scores)
                moves[index] = search.record(flat, beam_candidates(flat, search.candidate_count, search.config, search.rng))
        elif search.config.decode_strategy == "greedy_search":
            if greedy is None:
                greedy = logprobs.argmax(axis=-1)  # one pass over every row; the sampled rows' part unused
            moves[index] = search.record(greedy[start:end])
        else:
            moves[index] = search.record(sample_tokens(scores, search.config, search.rng))
    for (_, count), indices in beam_groups.items():
        flats = [searches[i].flat_scores(logprobs[bounds[i] : bounds[i + 1]]) for i in indices]
        candidates = top_k_indices(flats[0] if len(flats) == 1 else np.concatenate(flats), count)
        start = 0
        for i, flat in zip(indices, flats):
            moves[i] = searches[i].record(flat, candidates[start : start + len(flat)])
            start += len(flat)
    return moves

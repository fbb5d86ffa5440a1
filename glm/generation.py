"""Decoding for GLM with THUDM's semantics: greedy, sampling and beam search over a key/value cache.

Each blank is answered after `<|startofpiece|>` fed at the blank's position; the position channel stays
at the mask position while the block channel counts 1, 2, 3, ... Several blanks are filled left to
right, each answer joining the memory before the next blank starts (THUDM's generate_samples).

The model is used only through a ModelRunner (glm/model_runner.py: encode, extend, the DecodingRows of a
blank, the packed LM head); the server's engine passes its own runner. The search runs in NumPy on the
[rows, vocab] log-probabilities, in pieces: `process_scores` (THUDM's logit processors), `top_k_indices` /
`beam_candidates` (candidate selection) and `BeamHypotheses` (finished answers).

Batches are left-padded: padded keys are marked invalid in `memory_valid` and never attended.
"""

import copy
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import paddle

from .bounds import COUNT, LENGTH_PENALTY, MIN_TGT_LENGTH, NON_NEGATIVE, POSITIVE, RATIO, SEED, TGT_LENGTH
from .decoding_cache import as_tensor
from .errors import InvalidSettings
from .model_runner import ModelRunner
from .tokenization import GLMSpecialIds

__all__ = ["GenerationConfig", "GLMGenerator", "generate_answers", "default_banned_ids", "DECODE_STRATEGIES", "LENGTH_PENALTY_FORMS"]

DECODE_STRATEGIES = ("greedy_search", "sampling", "beam_search")
LENGTH_PENALTY_FORMS = ("thudm", "gnmt")


@dataclass
class GenerationConfig:
    decode_strategy: str = "beam_search"
    tgt_length: int = 160  # at most this many new tokens per blank
    min_tgt_length: int = 0  # end-of-piece is blocked until this many tokens exist
    num_beams: int = 1
    length_penalty: float = 1.0
    length_penalty_form: str = "thudm"  # score = logprob / len**lp; "gnmt": / ((5 + len) / 6)**lp
    early_stopping: bool = False  # stop a beam row as soon as it has num_beams finished hypotheses
    select_topk: bool = True  # beam candidates by top-k (THUDM's --select-topk); False samples them
    no_repeat_ngram_size: int = 0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    num_return_sequences: int = 1
    seed: Optional[int] = None  # NumPy seed of sampling

    def __post_init__(self):
        problems = []
        if self.decode_strategy not in DECODE_STRATEGIES:
            problems.append(("decode_strategy", f"must be one of {', '.join(DECODE_STRATEGIES)}; got {self.decode_strategy}"))
        if self.length_penalty_form not in LENGTH_PENALTY_FORMS:
            problems.append(("length_penalty_form", f"must be one of {', '.join(LENGTH_PENALTY_FORMS)}; got "
                                                    f"{self.length_penalty_form}"))
        ranges = [("tgt_length", TGT_LENGTH, {}), ("num_beams", COUNT, {}), ("num_return_sequences", COUNT, {}),
                  ("no_repeat_ngram_size", NON_NEGATIVE, {}), ("top_k", NON_NEGATIVE, {}), ("top_p", RATIO, {}),
                  ("temperature", POSITIVE, {}), ("length_penalty", LENGTH_PENALTY, {})]
        if self.seed is not None:
            ranges.append(("seed", SEED, {}))
        if TGT_LENGTH.problem(self.tgt_length) is None:
            ranges.append(("min_tgt_length", MIN_TGT_LENGTH, dict(high=self.tgt_length, high_is="tgt_length")))
        for name, bound, limits in ranges:
            problem = bound.problem(getattr(self, name), **limits)
            if problem:
                problems.append((name, problem))
        if not problems and self.decode_strategy == "beam_search" and self.num_return_sequences > self.num_beams:
            problems.append(("num_return_sequences", f"cannot exceed num_beams ({self.num_beams}) in beam search; "
                                                     f"got {self.num_return_sequences}"))
        if not problems and self.decode_strategy == "greedy_search" and self.num_return_sequences > 1:
            problems.append(("num_return_sequences", "must be 1 with greedy search (sampling or beam search give "
                                                     f"more); got {self.num_return_sequences}"))
        if problems:
            raise InvalidSettings(problems)


class BeamHypotheses:
    """The finished hypotheses of one source (THUDM/HF BeamHypotheses): the `num_beams` best by
    length-penalised score, and whether the open beams can still beat them."""

    def __init__(self, num_beams: int, config: GenerationConfig):
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


def rows_per_source(config: GenerationConfig) -> int:
    """Rows a source decodes at once: its beams, or its samples (greedy: one)."""
    return config.num_beams if config.decode_strategy == "beam_search" else config.num_return_sequences


def id_runs(ids) -> List[Tuple[int, int]]:
    """Ids as runs of consecutive ids, [(start, end)]: banning the embedding rows above a tokenizer's vocabulary
    (49,000 ids for the tiny tokenizer on a 50048-row model) is then a slice, not a scatter of every id."""
    ids = np.unique(np.asarray(ids, dtype="int64"))
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(ids, breaks) if run.size]


def process_scores(scores, generated, step, config, stop_ids, banned_ids):
    """THUDM's logit processors on log-probabilities [rows, vocab], in place, vectorised over rows: banned ids
    (as `id_runs`),
    min length (the stop ids until `min_tgt_length` tokens exist), no-repeat-ngram. `generated` [rows, step]
    holds every row's tokens so far. Returns `scores`."""
    for start, end in banned_ids:
        scores[:, start:end] = -np.inf
    if step < config.min_tgt_length:
        scores[:, stop_ids] = -np.inf
    n = config.no_repeat_ngram_size
    if n > 0 and step >= n:
        # An n-gram whose first n - 1 tokens equal the last n - 1 generated bans its last token. Windows start
        # at 0 .. step - n; compared as n - 1 shifted slices (sliding_window_view took half the step's search).
        starts = step - n + 1
        repeats = np.ones((generated.shape[0], starts), dtype=bool)
        for j in range(n - 1):
            repeats &= generated[:, j : j + starts] == generated[:, starts + j, None]
        row, start = np.nonzero(repeats)
        scores[row, generated[row, start + n - 1]] = -np.inf
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


class GLMGenerator:
    """Generates the answers of GLM blanks for a batch of tokenized sources.

    sources: token ids as GLMInputBuilder makes them (`[CLS] ... [gMASK] <|endoftext|>`); every
    [MASK]/[sMASK]/[gMASK] is a blank. `banned_ids` are never generated (e.g. glm-10b-chinese's [gMASK],
    the padded rows of the embedding above the tokenizer's vocabulary).
    """

    def __init__(self, model, special_ids: GLMSpecialIds, banned_ids: Sequence[int] = (), runner: Optional[ModelRunner] = None):
        self.runner = runner or ModelRunner(model)
        self.model = self.runner.model
        self.ids = special_ids
        self.stop_ids = np.array([special_ids.eop, special_ids.eos])
        self.banned_ids = id_runs(banned_ids)
        self.max_positions = self.model.config.max_sequence_length

    def with_runner(self, runner: ModelRunner) -> "GLMGenerator":
        """This generator (same special and banned ids) decoding through `runner` (the server's engine gives
        each source one of its own)."""
        other = copy.copy(self)
        other.runner, other.model = runner, runner.model
        return other

    @paddle.no_grad()
    def generate(self, sources: Sequence[Sequence[int]], config: GenerationConfig, on_blank=None) -> List[List[List[List[int]]]]:
        """Per source, per blank (left to right), the `num_return_sequences` best answers as token lists
        (without <|startofpiece|> and the stop token). Later blanks are conditioned on the best answer.
        `on_blank(blank, answers)`, if given, is called as each blank is decided (answers per live source)."""
        was_training = self.model.training
        self.model.eval()
        # The LM head is the largest matrix: MKL would re-pack all of it at every step (glm/packed_gemm.py).
        try:
            with self.runner.packed_lm_head(len(sources) * rows_per_source(config)):
                return self._generate(sources, config, on_blank)
        finally:
            if was_training:
                self.model.train()

    def _generate(self, sources, config, on_blank):
        blanks = [[i for i, token in enumerate(source) if token in self.ids.mask_ids] for source in sources]
        for index, (source, positions) in enumerate(zip(sources, blanks)):
            if not positions:
                raise ValueError(f"source {index} holds no [MASK], [sMASK] or [gMASK]: nothing to generate")
            if len(source) > self.max_positions or config.tgt_length > self.max_positions:
                raise ValueError(
                    f"source {index} has {len(source)} tokens and tgt_length is {config.tgt_length}; the model's "
                    f"max_sequence_length is {self.max_positions}"
                )
        rng = np.random.default_rng(config.seed)
        cache, memory_valid = self.runner.encode(sources, self.ids.pad)
        results = [[] for _ in sources]
        active = list(range(len(sources)))  # the sources whose rows are in the cache, in cache order
        for blank in range(max(len(positions) for positions in blanks)):
            keep = [i for i, source in enumerate(active) if len(blanks[source]) > blank]
            if len(keep) < len(active):  # sources with no blank left drop out of the cache
                index = as_tensor(np.array(keep, dtype="int64"))
                cache = [(paddle.index_select(k, index), paddle.index_select(v, index)) for k, v in cache]
                memory_valid = memory_valid[keep]
                active = [active[i] for i in keep]
            mask_positions = np.array([blanks[source][blank] for source in active])
            answers = self._decode_blank(cache, memory_valid, mask_positions, config, rng)
            if on_blank is not None:
                on_blank(blank, answers)
            for source, answer in zip(active, answers):
                results[source].append(answer)
            if any(len(blanks[source]) > blank + 1 for source in active):
                best = [answer[0] for answer in answers]
                cache, memory_valid = self._append_answers(cache, memory_valid, mask_positions, best)
        return results

    def _append_answers(self, cache, memory_valid, mask_positions, answers):
        """Puts `<|startofpiece|> answer` of each row into the memory, as THUDM does before the next blank."""
        length = 1 + max(len(answer) for answer in answers)
        input_ids = np.full((len(answers), length), self.ids.pad, dtype="int64")
        position_ids = np.zeros((len(answers), 2, length), dtype="int64")
        valid = np.zeros((len(answers), length), dtype=bool)
        for row, answer in enumerate(answers):
            input_ids[row, : len(answer) + 1] = [self.ids.sop] + list(answer)
            position_ids[row, 0] = mask_positions[row]
            position_ids[row, 1, : len(answer) + 1] = np.arange(1, len(answer) + 2)
            valid[row, : len(answer) + 1] = True
        cache, memory_valid, _ = self.runner.extend(cache, memory_valid, input_ids, position_ids, valid, True, False)
        return cache, memory_valid

    # -- the search ---------------------------------------------------------------------------------

    def _decode_blank(self, cache, memory_valid, mask_positions, config, rng):
        batch = len(mask_positions)
        # <|startofpiece|> joins the memory the beams / samples of a source share; it predicts token 1.
        sop = np.full((batch, 1), self.ids.sop, dtype="int64")
        position_ids = np.stack([mask_positions, np.ones_like(mask_positions)], axis=1)[:, :, None]
        cache, memory_valid, logprobs = self.runner.extend(
            cache, memory_valid, sop, position_ids, np.ones((batch, 1), dtype=bool), True, True
        )
        copies = rows_per_source(config)
        rows = self.runner.start_rows(cache, memory_valid, mask_positions, copies, config.tgt_length)
        search = self._beam_search if config.decode_strategy == "beam_search" else self._sample
        return search(rows, np.repeat(logprobs, copies, axis=0), batch, copies, config, rng)

    def _sample(self, rows, logprobs, batch, copies, config, rng):
        generated = np.full((batch * copies, config.tgt_length), self.ids.pad, dtype="int64")
        lengths = np.zeros(batch * copies, dtype="int64")
        finished = np.zeros(batch * copies, dtype=bool)
        live = np.arange(batch)  # the sources still decoding, in the order of `rows`
        for step in range(config.tgt_length):
            live_rows = (live[:, None] * copies + np.arange(copies)).reshape(-1)
            scores = process_scores(logprobs, generated[live_rows, :step], step, config, self.stop_ids,
                                    self.banned_ids)
            if config.decode_strategy == "greedy_search":
                tokens = scores.argmax(axis=-1)
            else:
                tokens = sample_tokens(scores, config, rng)
            going = ~finished[live_rows]
            finished[live_rows] |= (tokens[:, None] == self.stop_ids).any(axis=1)  # np.isin: 10x slower here
            writing = live_rows[going & ~finished[live_rows]]
            generated[writing, step] = tokens[going & ~finished[live_rows]]
            lengths[writing] += 1
            if finished.all() or step == config.tgt_length - 1:
                break
            keep = ~finished[live_rows].reshape(-1, copies).all(axis=1)  # a source goes when all its copies end
            tokens = np.where(finished[live_rows], self.ids.pad, tokens).astype("int64")
            rows.select(np.arange(len(live_rows)), keep)
            live = live[keep]
            logprobs = rows.step(tokens.reshape(-1, copies)[keep].reshape(-1))
        answers = [generated[row, : lengths[row]].tolist() for row in range(batch * copies)]
        return [answers[b * copies : (b + 1) * copies] for b in range(batch)]

    def _beam_search(self, rows, logprobs, batch, num_beams, config, rng):
        vocab = logprobs.shape[-1]
        hypotheses = [BeamHypotheses(num_beams, config) for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        beam_scores = np.zeros((batch, num_beams), dtype="float32")
        beam_scores[:, 1:] = -1e9  # all beams start equal: only beam 0 may propose at the first step
        generated = np.full((batch * num_beams, config.tgt_length), self.ids.pad, dtype="int64")
        live = np.arange(batch)  # the sources still searching, in the order of `rows`
        for step in range(config.tgt_length):
            live_rows = (live[:, None] * num_beams + np.arange(num_beams)).reshape(-1)
            scores = process_scores(logprobs, generated[live_rows, :step], step, config, self.stop_ids,
                                    self.banned_ids)
            flat = (scores + beam_scores[live].reshape(-1, 1)).reshape(len(live), num_beams * vocab)
            # THUDM takes 2 x beams candidates for its one end token; with two stop ids, 3 x beams
            # guarantees num_beams continuations even if every beam's best tokens are stops.
            candidates = beam_candidates(flat, (1 + len(self.stop_ids)) * num_beams, config, rng)
            next_scores = np.zeros((len(live), num_beams), dtype="float32")
            next_tokens = np.zeros((len(live), num_beams), dtype="int64")
            next_beams = np.zeros((len(live), num_beams), dtype="int64")  # the beam of its source each continues
            for i, b in enumerate(live):

                def finish(beam, score, b=b):
                    hypotheses[b].add(generated[b * num_beams + beam, :step].tolist(), score)

                next_scores[i], next_tokens[i], next_beams[i] = choose_beams(
                    candidates[i], flat[i], vocab, num_beams, self.stop_ids, finish)
                done[b] = hypotheses[b].is_done(float(flat[i, candidates[i, 0]]), step)
            generated[live_rows] = generated[(live[:, None] * num_beams + next_beams).reshape(-1)]
            generated[live_rows, step] = next_tokens.reshape(-1)
            beam_scores[live] = next_scores
            if done.all() or step == config.tgt_length - 1:
                break
            keep = ~done[live]  # finished sources leave the batch
            rows.select((np.arange(len(live))[:, None] * num_beams + next_beams).reshape(-1), keep)
            live = live[keep]
            logprobs = rows.step(next_tokens[keep].reshape(-1))
        results = []
        for b in range(batch):
            if not done[b]:  # out of length: the open beams compete with the finished ones
                for row in range(b * num_beams, (b + 1) * num_beams):
                    hypotheses[b].add(generated[row].tolist(), float(beam_scores.reshape(-1)[row]))
            results.append([tokens for _, tokens in hypotheses[b].kept[: config.num_return_sequences]])
        return results


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


def generate_answers(generator: GLMGenerator, builder, texts: Sequence[str], config: GenerationConfig,
                     batch_size: int, progress=None, sources: Optional[Sequence[Sequence[int]]] = None
                     ) -> List[List[List[str]]]:
    """Text in, text out: per text, per blank, the `num_return_sequences` answers as strings.

    Sources are built by `builder` (the same GLMInputBuilder training uses; `sources`: the texts' source
    ids when the caller built them already) and decoded in batches of similar length, so little padding
    is computed; results come back in the order of `texts`. `progress`, if given, is called with the
    number of texts finished after each batch.
    """
    if sources is None:
        sources = [builder.source_ids(text)[0] for text in texts]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    answers = [None] * len(sources)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for index, blanks in zip(batch, generator.generate([sources[i] for i in batch], config)):
            answers[index] = [[builder.tokenizer.decode(tokens).strip() for tokens in blank] for blank in blanks]
        if progress is not None:
            progress(len(batch))
    return answers


def default_banned_ids(config, tokenizer) -> List[int]:
    """Ids never to generate: the config's `bad_words_id` (glm-10b-chinese bans [gMASK], which shared an id
    with <|endofpiece|> in its pretraining) and the embedding rows above the tokenizer's vocabulary."""
    return sorted(set(getattr(config, "bad_words_id", None) or []) | set(range(len(tokenizer), config.vocab_size)))

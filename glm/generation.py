"""Decoding for GLM with THUDM's semantics: greedy, sampling and beam search over a key/value cache.

Each blank is answered after `<|startofpiece|>` fed at the blank's position; the position channel stays
at the mask position while the block channel counts 1, 2, 3, ... Several blanks are filled left to
right, each answer joining the memory before the next blank starts (THUDM's generate_samples).

The model is used only through a ModelRunner (glm/model_runner.py: encode, extend, the DecodingRows of a
blank, the packed LM head); the server's engine passes its own runner. The search of a blank is a search
object of glm/search.py (SampleSearch, BeamSearch) that the blank's DecodingRows alternate with the model's
steps (`decode`); the engine advances all its sources' searches at once.

Batches are left-padded: padded keys are marked invalid in `memory_valid` and never attended.
"""

import copy
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import paddle

from .bounds import COUNT, LENGTH_PENALTY, MIN_TGT_LENGTH, NON_NEGATIVE, POSITIVE, RATIO, SEED, TGT_LENGTH
from .decoding_cache import as_tensor
from .errors import InvalidSettings
from .model_runner import ModelRunner, without_last_column
from .search import id_runs, make_search
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


def rows_per_source(config: GenerationConfig) -> int:
    """Rows a source decodes at once: its beams, or its samples (greedy: one)."""
    return config.num_beams if config.decode_strategy == "beam_search" else config.num_return_sequences


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
        # MKL would re-pack every weight at every step, the LM head's 200 MB too (glm/packed_gemm.py).
        try:
            with self.runner.packed_weights(len(sources) * rows_per_source(config)):
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
        # The sources and the first blank's <|startofpiece|> in one pass: its memory ends with that token.
        first = np.array([positions[0] for positions in blanks])
        cache, memory_valid, logprobs = self.runner.encode(sources, self.ids.pad, start=(self.ids.sop, first))
        started = (cache, memory_valid, logprobs)
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
            answers = self._decode_blank(cache, memory_valid, mask_positions, config, rng, started if blank == 0 else None)
            if on_blank is not None:
                on_blank(blank, answers)
            for source, answer in zip(active, answers):
                results[source].append(answer)
            if any(len(blanks[source]) > blank + 1 for source in active):
                if blank == 0:  # the first <|startofpiece|> leaves: `<|startofpiece|> answer` goes in after the source
                    cache, memory_valid = without_last_column(cache, memory_valid)
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
        cache, memory_valid, _ = self.runner.extend(cache, memory_valid, input_ids, position_ids, valid, 0, False)
        return cache, memory_valid

    # -- the search ---------------------------------------------------------------------------------

    def _decode_blank(self, cache, memory_valid, mask_positions, config, rng, started=None):
        """`started`: (cache, memory_valid, log-probabilities) with the blank's <|startofpiece|> already in
        the memory (the first blank's, encoded with the sources)."""
        batch = len(mask_positions)
        # <|startofpiece|> joins the memory the beams / samples of a source share; it predicts token 1.
        if started is not None:
            cache, memory_valid, logprobs = started
        else:
            sop = np.full((batch, 1), self.ids.sop, dtype="int64")
            position_ids = np.stack([mask_positions, np.ones_like(mask_positions)], axis=1)[:, :, None]
            cache, memory_valid, logprobs = self.runner.extend(
                cache, memory_valid, sop, position_ids, np.ones((batch, 1), dtype=bool), 0, True
            )
        copies = rows_per_source(config)
        rows = self.runner.start_rows(cache, memory_valid, mask_positions, copies, config.tgt_length)
        search = make_search(config, batch, copies, rng, self.stop_ids, self.banned_ids, self.ids.pad)
        rows.decode(search, np.repeat(logprobs, copies, axis=0))
        return search.answers()


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
    # Packed once for all the batches: packing glm-large's weights takes longer than a short answer's steps.
    with generator.runner.packed_weights(batch_size * rows_per_source(config)):
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

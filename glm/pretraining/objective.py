"""GLM's pretraining objective, autoregressive blank infilling, with THUDM's semantics (blocklm_utils.py
`ConstructBlockStrategy` with --block-lm --task-mask; ../shared/GLM_RECIPE.md "Pretraining").

One objective is drawn per batch: token spans ([MASK]) with probability bert_prob, whole sentences
([sMASK]) with gap_sentence_prob, otherwise one long document-level span ([gMASK]). An example is

    Part A   the window, each span replaced by its one mask token        bidirectional (before sep)
    Part B   the spans in random order, each <|startofpiece|> span       causal, sees all of Part A
    labels   span <|endofpiece|> per block, one to the right of Part B

position_ids[0] counts Part A (a mask counts one) and is a span's mask position over its block;
position_ids[1] is 0 over Part A and 1..len+1 over a block. The document objective's suffix form (the
span is the window's end) is `A [gMASK] <|startofpiece|> target[:-1]` predicting `target`, with no
<|endofpiece|>: the text goes on. Spans never hold a document boundary (<|endoftext|>, [CLS]).
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..bounds import RATIO
from ..inputs import IGNORE_INDEX, GLMExample
from ..tokenization import GLMSpecialIds

__all__ = [
    "OBJECTIVES", "SENTENCE_END_CHARACTERS", "MAX_BLOCK_LENGTH", "PretrainingArguments", "PretrainingExample",
    "BlankInfillingBuilder", "sentence_end_table", "span_length_distribution",
]  # fmt: skip

OBJECTIVES = ("token", "sentence", "document")
# THUDM's contains_sentence_end: a token whose piece holds one of these ends a sentence. The GLM
# tokenizer normalises with NFKC, so the full-width ？！；： arrive as ?!;: (。 stays).
SENTENCE_END_CHARACTERS = (".", "?", "!", ";", ":", "。", "？", "！", "；", "…", "\n")
MAX_BLOCK_LENGTH = 40  # token spans are 1..39 tokens (THUDM's max_block_length, exclusive)
SUFFIX_PROB = 0.5  # THUDM's gpt_infill_prob: the document span is the window's end this often, else anywhere
SHORT_PIECE_MIN = 32  # THUDM's split_samples: pieces of 32 .. seq_length - 2 tokens


@dataclass
class PretrainingArguments:
    """The objective's flags (THUDM's names; defaults are glm-large-chinese's, config/ds_block_large_chinese.sh)."""

    seq_length: int = field(default=512, metadata={"help": "Window length in tokens, [CLS] included (THUDM --seq-length)."})
    bert_prob: float = field(default=0.4, metadata={"help": "Share of batches with the token objective: spans -> [MASK]."})
    gap_sentence_prob: float = field(
        default=0.3, metadata={"help": "Share of batches with the sentence objective: whole sentences -> [sMASK]; "
                                       "the rest of the batches take the document objective ([gMASK])."})
    avg_block_length: float = field(default=3.0, metadata={"help": "Token objective: Poisson mean of span lengths (1..39)."})
    bert_ratio: float = field(default=0.15, metadata={"help": "Token objective: share of the window covered by spans."})
    gap_sentence_ratio: float = field(default=0.15, metadata={"help": "Sentence objective: share of the window covered by sentences."})
    gpt_min_ratio: float = field(default=0.25, metadata={"help": "Document objective: the span is at least this share of the window."})
    short_seq_prob: float = field(
        default=0.02, metadata={"help": "Share of batches whose windows are cut into pieces of 32..seq_length tokens, at sentence ends."})

    def problem(self) -> Optional[str]:
        """What is wrong with these flags, in one line, or None."""
        for name in ("bert_prob", "gap_sentence_prob", "bert_ratio", "gap_sentence_ratio", "gpt_min_ratio", "short_seq_prob"):
            problem = RATIO.problem(getattr(self, name))
            if problem:
                return f"--{name} {problem}"
        if self.bert_prob + self.gap_sentence_prob > 1.0 + 1e-9:
            return (f"--bert_prob {self.bert_prob} + --gap_sentence_prob {self.gap_sentence_prob} exceed 1 "
                    "(the document objective takes the rest)")
        if not self.avg_block_length > 0:
            return f"--avg_block_length must be above 0; got {self.avg_block_length}"
        shortest = SHORT_PIECE_MIN + 2 if self.short_seq_prob > 0 else 8
        if self.seq_length < shortest:
            return f"--seq_length must be at least {shortest}" + (
                " with --short_seq_prob above 0 (its pieces are 32 tokens and more)" if self.short_seq_prob > 0 else "")
        return None

    def mixture(self):
        """{objective: probability of a batch}."""
        return dict(zip(OBJECTIVES, (self.bert_prob, self.gap_sentence_prob, max(0.0, 1.0 - self.bert_prob - self.gap_sentence_prob))))


@dataclass
class PretrainingExample(GLMExample):
    """A built example, with what it was built from (for --dump_examples and the tests)."""

    objective: str = ""
    window: Optional[List[int]] = None

    def record(self) -> dict:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "sep": self.sep, "labels": self.labels,
                "loss_mask": self.loss_mask, "objective": self.objective, "window": self.window}


def sentence_end_table(tokenizer) -> np.ndarray:
    """bool per token id: whether its piece ends a sentence (THUDM's contains_sentence_end)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return np.array([any(c in piece for c in SENTENCE_END_CHARACTERS) for piece in pieces], dtype=bool)


def span_length_distribution(avg_block_length: float) -> np.ndarray:
    """P(length) for lengths 1..MAX_BLOCK_LENGTH - 1: Poisson(avg_block_length) restricted and renormalised."""
    lengths = np.arange(1, MAX_BLOCK_LENGTH)
    log_pmf = lengths * math.log(avg_block_length) - avg_block_length - np.array([math.lgamma(k + 1) for k in lengths])
    pmf = np.exp(log_pmf - log_pmf.max())
    return pmf / pmf.sum()


Span = Tuple[int, int]  # [start, end) in the window


class BlankInfillingBuilder:
    """Builds a batch's examples from its windows (token id arrays starting with [CLS]; documents end in
    <|endoftext|>, a later one starts with [CLS]), drawing everything from the batch's `rng`."""

    def __init__(self, args: PretrainingArguments, ids: GLMSpecialIds, sentence_end: np.ndarray):
        self.args, self.ids, self.sentence_end = args, ids, sentence_end
        self.span_lengths = np.arange(1, MAX_BLOCK_LENGTH)
        self.span_length_p = span_length_distribution(args.avg_block_length)
        self.thresholds = np.cumsum([args.bert_prob, args.gap_sentence_prob])

    def build_batch(self, windows: Sequence[np.ndarray], rng: np.random.Generator) -> List[PretrainingExample]:
        """The training draw (THUDM's construct_blocks): maybe cut the windows short, draw the objective, build."""
        if rng.random() < self.args.short_seq_prob:
            windows = self.short_pieces(windows, rng)
        objective = OBJECTIVES[int(np.searchsorted(self.thresholds, rng.random(), side="right"))]
        examples = self.build(windows, objective, rng)
        if not examples:  # no window could hold the drawn blanks (tiny documents): a document batch instead
            examples = self.build(windows, "document", rng)
        return examples

    def build(self, windows: Sequence[np.ndarray], objective: str, rng) -> List[PretrainingExample]:
        """The batch's examples under `objective`; a window that cannot hold its spans is left out (THUDM)."""
        if objective == "document":
            return self.document_examples(windows, rng)
        make = self.token_example if objective == "token" else self.sentence_example
        return [example for example in (make(np.asarray(w), rng) for w in windows) if example is not None]

    # -- token objective -------------------------------------------------------------------------------

    def token_example(self, window: np.ndarray, rng) -> Optional[PretrainingExample]:
        target = int(self.args.bert_ratio * len(window))
        if target == 0:
            return None
        # Lengths drawn until they cover the target (each is >= 1, so `target` draws always suffice).
        drawn = rng.choice(self.span_lengths, size=target, p=self.span_length_p)
        lengths = drawn[: int(np.searchsorted(np.cumsum(drawn), target)) + 1].tolist()
        rng.shuffle(lengths)
        spans = self.spans_in_documents(window, lengths, rng)
        if spans is None:
            return None
        return self.block_example(window, spans, self.ids.mask, "token", rng)

    def spans_in_documents(self, window: np.ndarray, lengths: List[int], rng) -> Optional[List[Span]]:
        """THUDM's sample_span_in_document: the window's documents, shortest first, each take spans (in
        order) up to bert_ratio of their length; the longest takes all the rest that fit. None when some
        span found no room. The window's last token is never covered (THUDM)."""
        documents, last = [], len(window)
        for boundary in reversed([-1] + np.flatnonzero(window == self.ids.eos).tolist()):
            start = boundary + 1
            if start < len(window) and window[start] == self.ids.cls:
                start += 1
            length = last - start
            if last == len(window) and length > 0:
                length -= 1
            documents.append((start, max(length, 0)))
            last = boundary
        documents.sort(key=lambda document: document[1])
        spans, taken = [], 0
        for number, (offset, length) in enumerate(documents):
            longest = number == len(documents) - 1
            budget = length if longest else int(length * self.args.bert_ratio)
            count, covered = 0, 0
            while taken + count < len(lengths):
                grown = covered + lengths[taken + count]
                # The longest document also needs one token between neighbouring spans.
                if grown + (count if longest else 0) > budget or grown + count > length:
                    break
                covered, count = grown, count + 1
            if count:
                spans += self.place_spans(lengths[taken : taken + count], length, offset, rng)
                taken += count
        return spans if taken == len(lengths) else None

    @staticmethod
    def place_spans(lengths: List[int], room: int, offset: int, rng) -> List[Span]:
        """THUDM's sample_spans: spans of `lengths`, in that order, at random within [offset, offset + room),
        never overlapping or touching."""
        free = room - sum(lengths) - len(lengths) + 1
        places = np.sort(rng.integers(0, free + 1, size=len(lengths)))
        spans = []
        for place, length in zip(places.tolist(), lengths):
            spans.append((offset + place, offset + place + length))
            offset += length + 1
        return spans

    # -- sentence objective ----------------------------------------------------------------------------

    def sentences(self, window: np.ndarray) -> List[Span]:
        """The window's whole sentences: spans ending at a sentence-end token, after the previous one or a
        document boundary. (THUDM also takes a window's unterminated tail and lets a later document's
        sentence start with its [CLS]; the recipe's sentences end at a sentence end and hold no boundary.)"""
        ends = self.sentence_end[window]
        boundaries = (window == self.ids.eos) | (window == self.ids.cls)
        spans, start = [], 0
        for i in np.flatnonzero(ends | boundaries).tolist():
            if boundaries[i]:
                start = i + 1
            else:
                if start < i + 1:
                    spans.append((start, i + 1))
                start = i + 1
        return spans

    def sentence_example(self, window: np.ndarray, rng) -> Optional[PretrainingExample]:
        candidates = self.sentences(window)
        if not candidates:
            return None
        order = rng.permutation(len(candidates))
        target = int(self.args.gap_sentence_ratio * len(window))
        spans, covered = [], 0
        for index in order.tolist():
            spans.append(candidates[index])
            covered += candidates[index][1] - candidates[index][0]
            if covered >= target:
                break
        return self.block_example(window, spans, self.ids.smask, "sentence", rng)

    # -- document objective ----------------------------------------------------------------------------

    def document_examples(self, windows: Sequence[np.ndarray], rng) -> List[PretrainingExample]:
        """One span per window, its length drawn once per batch between gpt_min_ratio of the shortest window
        and the longest minus 2 (THUDM). A window spanning documents, or one in SUFFIX_PROB, takes the suffix
        form; the others one [gMASK] span placed anywhere, with <|endofpiece|>."""
        windows = [np.asarray(w) for w in windows]
        shortest, longest = min(map(len, windows)), max(map(len, windows))
        high = longest - 2
        low = min(high, max(1, int(self.args.gpt_min_ratio * shortest)))
        generation = int(rng.integers(low, high, endpoint=True))
        examples = []
        for window in windows:
            length = min(generation, len(window) - 2)
            boundaries = np.flatnonzero(window == self.ids.eos)
            several_documents = len(boundaries) > 0 and boundaries[0] != len(window) - 1
            if several_documents or rng.random() < SUFFIX_PROB:
                examples.append(self.suffix_example(window, length))
            else:
                spans = self.spans_in_documents(window, [length], rng)
                examples.append(self.block_example(window, spans, self.ids.gmask, "document", rng))
        return examples

    def suffix_example(self, window: np.ndarray, length: int) -> PretrainingExample:
        """`A [gMASK] <|startofpiece|> target[:-1]` predicting `target` (no <|endofpiece|>: the text goes on).
        As THUDM, a later document's [CLS] in the target is not scored."""
        division = len(window) - length
        source, target = window[:division].tolist(), window[division:].tolist()
        sep = division + 1
        return PretrainingExample(
            input_ids=source + [self.ids.gmask, self.ids.sop] + target[:-1],
            position_ids=[list(range(sep)) + [division] * length, [0] * sep + list(range(1, length + 1))],
            sep=sep,
            labels=[IGNORE_INDEX] * sep + target,
            loss_mask=[0] * sep + [int(token != self.ids.cls) for token in target],
            objective="document",
            window=window.tolist(),
        )

    # -- building --------------------------------------------------------------------------------------

    def block_example(self, window: np.ndarray, spans: List[Span], mask_id: int, objective: str, rng) -> PretrainingExample:
        """THUDM's make_block_data: Part A with each span as `mask_id`, then the spans in random order."""
        tokens = window.tolist()
        spans = sorted(spans)
        part_a, mask_positions, last = [], [], 0
        for start, end in spans:
            part_a += tokens[last:start]
            mask_positions.append(len(part_a))
            part_a.append(mask_id)
            last = end
        part_a += tokens[last:]
        sep = len(part_a)
        input_ids, labels, loss_mask = list(part_a), [IGNORE_INDEX] * sep, [0] * sep
        positions, blocks = list(range(sep)), [0] * sep
        for index in rng.permutation(len(spans)).tolist():
            start, end = spans[index]
            span = tokens[start:end]
            input_ids += [self.ids.sop] + span
            labels += span + [self.ids.eop]
            loss_mask += [1] * (len(span) + 1)
            positions += [mask_positions[index]] * (len(span) + 1)
            blocks += list(range(1, len(span) + 2))
        return PretrainingExample(input_ids, [positions, blocks], sep, labels, loss_mask, objective=objective,
                                  window=tokens)

    # -- short pieces ----------------------------------------------------------------------------------

    def short_pieces(self, windows: Sequence[np.ndarray], rng) -> List[np.ndarray]:
        """THUDM's split_samples: each window becomes (seq_length - 1) // n pieces of about n tokens (n drawn
        once per batch), each starting after and ending at a sentence end where one is near, with [CLS]."""
        size = int(rng.integers(SHORT_PIECE_MIN, self.args.seq_length - 1))
        count = (self.args.seq_length - 1) // size
        pieces = []
        for window in windows:
            tokens = np.asarray(window)[1:]
            breaks = self.sentence_end[tokens] | (tokens == self.ids.eos)  # a piece may end at these
            for _ in range(count):
                if size >= len(tokens):
                    start, end = 0, len(tokens)
                else:
                    start = int(rng.integers(0, len(tokens) - size))
                    while start > 0 and (tokens[start] == self.ids.eos or not breaks[start - 1]):
                        start -= 1
                    end = start + size
                    while end > start and not breaks[end - 1]:
                        end -= 1
                    if end - start < size // 2:
                        end = start + size
                if tokens[start] == self.ids.cls:  # after an <|endoftext|>: one [CLS] leads the piece
                    start += 1
                pieces.append(np.concatenate([[self.ids.cls], tokens[start:end]]).astype(np.int64))
        return pieces

"""Windows of a prepared corpus as THUDM's BlockDataset cuts them (data_utils/datasets.py), each a pure
function of (corpus, seed, index).

A window starts with [CLS]. Documents are drawn uniformly (get_weighted_samples: one document index), each
with its <|endoftext|>. A document longer than the window gives a window from a random start, moved back or
forward (by up to half a window) to a sentence start, then cut back to its last sentence end when that keeps
at least half of it (right_strip_seq). A shorter one is followed by further drawn documents, each
`[CLS] document <|endoftext|>`, the one that fills the window cut the same way to the room left.
"""

import numpy as np

from ..tokenization import GLMSpecialIds

from .corpus import PretrainingCorpus

__all__ = ["WindowSampler"]


class WindowSampler:
    def __init__(self, corpus: PretrainingCorpus, seq_length: int, ids: GLMSpecialIds, sentence_end: np.ndarray, seed: int):
        self.corpus, self.seq_length, self.ids, self.sentence_end, self.seed = corpus, seq_length, ids, sentence_end, seed

    def document(self, rng) -> np.ndarray:
        """A random document with its <|endoftext|> (THUDM's get_weighted_samples and getidx)."""
        index = int(rng.integers(self.corpus.num_documents))
        return np.append(self.corpus.document(index).astype(np.int64), self.ids.eos)

    def window(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        length = self.seq_length
        tokens = self.document(rng)
        excess = len(tokens) - length + 1
        if excess > 0:
            start = self.sentence_start(tokens, int(rng.integers(excess)), forward=rng.random() >= 0.5)
            return self.cut_at_sentence_end(np.concatenate([[self.ids.cls], tokens[start:]]), length)
        parts, filled = [np.concatenate([[self.ids.cls], tokens])], 1 + len(tokens)
        while filled < length:
            part = self.cut_at_sentence_end(np.concatenate([[self.ids.cls], self.document(rng)]), length - filled)
            parts.append(part)
            filled += len(part)
        return np.concatenate(parts)

    def sentence_start(self, tokens: np.ndarray, start: int, forward: bool) -> int:
        """`start` moved back or forward, by at most half a window, to the nearest position after a sentence
        end; where none is that near, by the whole half window. A document's first token starts a sentence."""
        if start == 0:
            return 0
        limit = self.seq_length // 2
        if forward:
            candidates = np.arange(start, min(len(tokens), start + limit) + 1)
            found = candidates[self.sentence_end[tokens[candidates - 1]]]
            return int(found[0]) if len(found) else int(candidates[-1])
        candidates = np.arange(max(0, start - limit), start + 1)
        after_end = candidates == 0
        after_end[candidates > 0] = self.sentence_end[tokens[candidates[candidates > 0] - 1]]
        found = candidates[after_end]
        return int(found[-1]) if len(found) else int(candidates[0])

    def cut_at_sentence_end(self, tokens: np.ndarray, room: int) -> np.ndarray:
        """At most `room` tokens, ending at the last sentence end when that keeps half the room."""
        if len(tokens) <= room:
            return tokens
        ends = np.flatnonzero(self.sentence_end[tokens[:room]])
        keep = int(ends[-1]) + 1 if len(ends) and ends[-1] + 1 >= room // 2 else room
        return tokens[:keep]

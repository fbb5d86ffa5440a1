"""The one interface decoding uses to run the model: GLMGenerator (predict, evaluate) and the server's engine
both go through a ModelRunner, and nothing else reaches into the model while decoding.

  * `extend`: feed [rows, q] tokens with explicit 2-D positions on top of a plain cache (encoding sources
    with the first blank's `<|startofpiece|>`, a later blank's, answers put into memory between blanks); the
    cache comes back;
  * `start_rows`: the DecodingRows of one blank (`copies` rows per source over a DecodingBatch);
  * `step`: one token per row of one or more DecodingBatches through ONE forward, the last position's
    log-probabilities back in NumPy;
  * `packed_weights(rows)`: a context in which the LM head and the layers' weight matmuls of up to `rows`
    rows run through MKL's packed GEMM (glm/packed_gemm.py). The runner owns the packs and hands them to
    each forward; the model is never modified.

A P-tuning v2 prefix (glm/prefix.py) is the memory every source starts from: `encode` puts its keys and
values in front of the source's, once per source, so a source's beams and samples share it as they share
the source.
"""

import contextlib
from typing import List, Sequence

import numpy as np

from .decoding_cache import DecodingBatch, DecodingCacheGroup, DecodingMaskGroup, StepMask, as_tensor, joined_memories
from .packed_gemm import PackedLinears, packed_transposed
from .prefix import prefix_model

__all__ = ["ModelRunner", "DecodingRows", "log_softmax", "extend_kind", "without_last_column"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of float32 logits [rows, vocab], as `logits - logsumexp(logits)`. In NumPy: Paddle's
    CPU logsumexp took 7-9 ms for 20 x 50048 (this takes ~1.5 ms) and its log_softmax ~100x longer."""
    top = logits.max(axis=-1, keepdims=True)
    return logits - (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))


class ModelRunner:
    """Runs a GLMForConditionalGeneration (or a peft model wrapping one) for decoding, in eval mode and
    without gradients (the caller's job: GLMGenerator.generate and the engine's loop)."""

    def __init__(self, model, prefix=None):
        """`model`: a GLM, or a peft model wrapping one (LoRA, a prefix); `prefix`: the GLMPrefixModel whose
        prefix every source starts from (default: `model`'s own, if it has one)."""
        self.prefix = prefix if prefix is not None else prefix_model(model)
        self.model = getattr(model, "model", model)  # a peft model wraps the GLM it adapts
        self._packed = None  # the LM head packed for MKL, inside `packed_weights`
        self._linears = None  # the layers' weights packed for MKL (PackedLinears), inside `packed_weights`
        self._packing = False

    @property
    def packing(self) -> bool:
        """Inside `packed_weights` (whether or not anything could be packed)."""
        return self._packing

    @property
    def weights_packed(self) -> bool:
        """Inside `packed_weights`, where MKL's packed GEMM runs (not on GPU, not without Paddle's MKL)."""
        return self._packed is not None

    @contextlib.contextmanager
    def packed_weights(self, rows: int):
        """The LM head and the layers' plain linear weights packed for products of up to `rows` rows while
        inside (a nested use keeps the outer packs). The packs are a copy of the weights (so as much memory
        again), valid while the weights do not change, dropped on exit."""
        if self._packing:
            yield
            return
        self._packing = True
        self._packed = packed_transposed(self.model.glm.word_embeddings.weight, rows)
        if self._packed is not None:
            self._linears = PackedLinears(self.model.glm.transformer, rows)
        try:
            yield
        finally:
            self._packed = self._linears = None
            self._packing = False

    def forward(self, cache, input_ids, position_ids, mask):
        """The backbone over NumPy inputs: (hidden states, cache). `mask`: a 0/1 array [N, 1, q, M + q] or a
        StepMask (a decoding step's)."""
        mask = mask if isinstance(mask, StepMask) else as_tensor(mask)
        return self.model.glm(as_tensor(input_ids), as_tensor(position_ids), mask, cache=cache, use_cache=True,
                              return_dict=False, packed=self._linears)

    def logprobs(self, hidden) -> np.ndarray:
        """The last position's log-probabilities [N, vocab], float32 in NumPy: the one host transfer of a step."""
        logits = self.model.lm_logits(hidden[:, -1], packed=self._packed)
        return log_softmax(logits.numpy().astype("float32", copy=False))

    def extend(self, cache, memory_valid, input_ids, position_ids, new_valid, bidirectional, with_logprobs):
        """Feed [N, q] tokens on top of the memory (`cache` None or per layer (keys, values); memory_valid bool
        [N, M]); returns (cache, memory_valid, last-position log-probs or None). The first `bidirectional` new
        tokens see each other both ways (a source: GLM's Part A); the others see the new tokens up to themselves
        (0: all causal, as answers are; q: a source alone). Every token sees the valid memory."""
        rows, q = input_ids.shape
        memory = memory_valid.shape[1]
        seen = np.tri(q, dtype=bool) | (np.arange(q) < bidirectional)  # [query, key]
        new_keys = new_valid[:, None, :] & seen
        old_keys = np.broadcast_to(memory_valid[:, None, :], (rows, q, memory))
        mask = np.concatenate([old_keys, new_keys], axis=-1)[:, None]  # [N, 1, q, M + q]
        hidden, cache = self.forward(cache or None, input_ids, position_ids, mask)
        logprobs = self.logprobs(hidden) if with_logprobs else None
        return cache, np.concatenate([memory_valid, new_valid], axis=1), logprobs

    def extend_many(self, calls: List[tuple], pad: int) -> List[tuple]:
        """Several `extend` calls of one `extend_kind` (their argument tuples) as ONE forward: each call's
        memory and new tokens left-padded to the longest (padding is marked invalid, so never attended; the
        last position stays each call's last token). Returns each call's result, its cache holding the padding
        columns (invalid in its memory_valid)."""
        kinds = {extend_kind(call) for call in calls}
        if len(kinds) > 1:
            raise ValueError(f"extend_many: calls of different kinds {sorted(kinds, key=str)}")
        q = max(call[2].shape[1] for call in calls)
        causal_tokens = extend_kind(calls[0])[1]
        bidirectional = 0 if causal_tokens is None else q - causal_tokens  # the padding joins the source
        input_ids, position_ids, new_valid = [], [], []
        for _, _, ids, positions, new, _, _ in calls:
            rows, short = ids.shape[0], q - ids.shape[1]
            input_ids.append(np.concatenate([np.full((rows, short), pad, dtype="int64"), ids], axis=1))
            position_ids.append(np.concatenate([np.zeros((rows, 2, short), dtype="int64"), positions], axis=2))
            new_valid.append(np.concatenate([np.zeros((rows, short), dtype=bool), new], axis=1))
        cache, memory_valid = joined_memories([(call[0] or None, call[1]) for call in calls])
        cache, valid, logprobs = self.extend(cache, memory_valid, np.concatenate(input_ids), np.concatenate(position_ids),
                                             np.concatenate(new_valid), bidirectional, calls[0][6])  # fmt: skip
        results, start = [], 0
        for call in calls:
            end = start + call[2].shape[0]
            results.append(([(k[start:end], v[start:end]) for k, v in cache], valid[start:end],
                            None if logprobs is None else logprobs[start:end]))
            start = end
        return results

    def encode(self, sources: Sequence[Sequence[int]], pad: int, start=None):
        """One pass over the sources, left-padded, after the prefix if there is one: (cache, memory_valid).
        `start`: (the <|startofpiece|> id, each source's first blank position): that blank's <|startofpiece|>
        goes through the same pass, after the source and seeing all of it, as THUDM's first forward over
        `source <|startofpiece|>` does; it returns (cache, memory_valid, its log-probabilities), the cache's
        last column the <|startofpiece|>'s (`without_last_column` gives the source's memory alone)."""
        length = max(len(source) for source in sources)
        input_ids = np.full((len(sources), length), pad, dtype="int64")
        position_ids = np.zeros((len(sources), 2, length), dtype="int64")
        valid = np.zeros((len(sources), length), dtype=bool)
        for row, source in enumerate(sources):
            begin = length - len(source)
            input_ids[row, begin:] = source
            position_ids[row, 0, begin:] = np.arange(len(source))
            valid[row, begin:] = True
        if start is not None:
            sop, mask_positions = start
            input_ids = np.concatenate([input_ids, np.full((len(sources), 1), sop, dtype="int64")], axis=1)
            sop_positions = np.stack([mask_positions, np.ones_like(mask_positions)], axis=1)[:, :, None]
            position_ids = np.concatenate([position_ids, sop_positions.astype("int64")], axis=2)
            valid = np.concatenate([valid, np.ones((len(sources), 1), dtype=bool)], axis=1)
        cache, memory = None, np.zeros((len(sources), 0), dtype=bool)
        if self.prefix is not None:
            cache = self.prefix.layer_caches(len(sources))
            memory = np.ones((len(sources), self.prefix.num_prefix_tokens), dtype=bool)
        cache, memory_valid, logprobs = self.extend(cache, memory, input_ids, position_ids, valid, length, start is not None)
        return (cache, memory_valid) if start is None else (cache, memory_valid, logprobs)

    def start_rows(self, cache, memory_valid, mask_positions, copies: int, capacity: int) -> "DecodingRows":
        """The rows decoding one blank from memory `cache`: `copies` per source, at most `capacity` steps."""
        return DecodingRows(self, DecodingBatch(cache, memory_valid, copies, capacity), mask_positions)

    def step(self, batches: List[DecodingBatch], tokens: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """One token per row of every batch (rows in batch order) through one forward; position_ids [rows, 2].
        Returns the next log-probabilities [rows, vocab]."""
        for batch in batches:
            batch.advance()
        if len(batches) == 1:
            cache, mask = batches[0].caches, batches[0].mask
        else:  # one projection for all rows; each batch attends over its own keys
            cache = [DecodingCacheGroup([batch.caches[layer] for batch in batches]) for layer in range(len(batches[0].caches))]
            mask = DecodingMaskGroup([batch.mask for batch in batches])
        hidden, _ = self.forward(cache, tokens[:, None], position_ids[:, :, None], mask)
        return self.logprobs(hidden)


def extend_kind(call: tuple) -> tuple:
    """What `extend` calls (argument tuples) must share to run as one forward (extend_many): a prefix memory
    or none, the number of causal tokens at the end (None: all causal, whatever their number), log-probs or not."""
    cache, _, input_ids, _, _, bidirectional, with_logprobs = call
    causal = input_ids.shape[1] - bidirectional
    return cache is None, None if bidirectional == 0 else max(causal, 0), bool(with_logprobs)


def without_last_column(cache, memory_valid):
    """A memory (cache, memory_valid) without its last key column."""
    return [(keys[:, :, :-1], values[:, :, :-1]) for keys, values in cache], memory_valid[:, :-1]


class DecodingRows:
    """The rows decoding one blank of one generate call: `copies` rows (beams or samples) per live source,
    stepping together. The search (`decode`) only steps them, reorders them and drops finished sources."""

    def __init__(self, runner: ModelRunner, batch: DecodingBatch, mask_positions):
        self.runner, self.batch, self.copies = runner, batch, batch.beams
        self.mask_positions = np.repeat(mask_positions, self.copies)  # per row: the position channel stays there
        self.generated = 0  # tokens fed since <|startofpiece|>

    def decode(self, search, logprobs: np.ndarray):
        """Runs `search` (glm/search.py) over these rows to its end, from the log-probabilities of their first
        token: its moves reorder and drop rows and feed the next tokens."""
        while True:
            move = search.advance(logprobs)
            if move is None:
                return
            self.select(move.rows, move.keep)
            logprobs = self.step(move.tokens)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feeds one token per row; returns the next log-probabilities [rows, vocab]."""
        self.generated += 1
        blocks = np.full_like(self.mask_positions, self.generated + 1)
        return self.runner.step([self.batch], tokens, np.stack([self.mask_positions, blocks], axis=1))

    def select(self, rows: np.ndarray, keep_sources: np.ndarray):
        """Row i continues row rows[i] (of its own source); sources where keep_sources is False leave."""
        if not keep_sources.all():
            rows = rows.reshape(-1, self.copies)[keep_sources].reshape(-1)
            self.mask_positions = self.mask_positions.reshape(-1, self.copies)[keep_sources].reshape(-1)
        self.batch.select(rows, keep_sources)

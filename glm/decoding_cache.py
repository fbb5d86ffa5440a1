"""The key/value cache GLM decodes over, one new token per row a step, and the mask that says which of its
keys each row sees. glm/model_runner.py drives them; GLMAttention only calls `attend` on whatever
`StepCache` it is given and adds the `StepMask`'s bias, so the model knows none of this module's layouts.

A DecodingBatch holds the rows of several sources (`beams` rows each: beams, or sampled copies) in one
buffer per layer, so a step attends for all of them in a few ops. Sources may join at any step (the
server's continuous batching) and leave when done: a joining source's memory is left-padded into the
shared memory columns and it sees only the step slots written after it joined. A group of batches of
different widths steps through one forward (DecodingCacheGroup / DecodingMaskGroup).
"""

from typing import List, Tuple

import numpy as np
import paddle

__all__ = ["MASKED_SCORE", "LayerCache", "StepCache", "StepMask", "DecodingCache", "DecodingMask", "DecodingBatch",
           "DecodingCacheGroup", "DecodingMaskGroup", "left_padded", "joined_memories"]

# Added to masked scores. Scores are always float32 when the bias is added (manual path), so this never
# meets float16; the fused path scales it to the compute dtype (see `_fused_mask_value`).
MASKED_SCORE = -1e9

LayerCache = Tuple[paddle.Tensor, paddle.Tensor]  # (keys, values), each [B, heads, M, head_dim]

# A DecodingBatch drops the columns of steps written before every live source joined once they are this many
# (a copy of the caches: not at every join).
DEAD_STEPS_KEPT = 64


class StepCache:
    """What GLMAttention accepts as a decoding step's cache: `attend(attention, qkv, bias)` returns the
    context [rows, 1, hidden] of the step's projected rows; `memory_length` is the key positions so far."""

    memory_length: int

    def attend(self, attention, qkv, bias):
        raise NotImplementedError


class StepMask:
    """What the model accepts as a decoding step's attention mask: `layer_bias()` is handed to every layer."""

    def layer_bias(self):
        raise NotImplementedError


def _zeros_like_columns(tensor, columns):
    shape = list(tensor.shape)
    shape[2] = columns
    return paddle.zeros(shape, dtype=tensor.dtype)


def left_padded(tensor, width: int):
    """Keys or values [sources, heads, columns, head_dim] with zero columns in front, to `width` columns (a
    memory padded to a wider one: the mask marks those columns invalid)."""
    gap = width - tensor.shape[2]
    return paddle.concat([_zeros_like_columns(tensor, gap), tensor], axis=2) if gap else tensor


def joined_memories(memories):
    """Several sources' memories, each (cache or None, memory_valid), as one: each left-padded to the widest
    (the padding marked invalid) and stacked along the sources. One memory comes back as it is (no copy)."""
    if len(memories) == 1:
        return memories[0]
    width = max(valid.shape[1] for _, valid in memories)
    valid = np.concatenate([np.pad(v, ((0, 0), (width - v.shape[1], 0))) for _, v in memories])
    if memories[0][0] is None:
        return None, valid
    cache = [tuple(paddle.concat([left_padded(memory[0][layer][part], width) for memory in memories]) for part in (0, 1))
             for layer in range(len(memories[0][0]))]  # fmt: skip
    return cache, valid


class DecodingCache(StepCache):
    """One layer's keys and values for a DecodingBatch: [sources, heads, columns, head_dim]. Columns
    [0, memory) hold each source's memory (source, earlier answers, <|startofpiece|>), left-padded; then
    `beams` columns per step, where that step's rows write their keys and values (row j of a source writes
    column j of the step). Keys never move on a beam reorder: which columns a row sees is the mask's business,
    so a source's beams attend together as one small matrix over the whole buffer."""

    def __init__(self, memory: LayerCache, beams: int, capacity: int):
        keys, values = memory
        self.keys = paddle.concat([keys, _zeros_like_columns(keys, beams * capacity)], axis=2)
        self.values = paddle.concat([values, _zeros_like_columns(values, beams * capacity)], axis=2)
        self.beams, self.length = beams, keys.shape[2]

    @property
    def memory_length(self) -> int:  # key columns written so far: memory + beams x steps
        return self.length

    def attend(self, attention, qkv, bias):
        return attention.decoding_attention(qkv, bias, self)

    def write(self, key, value):
        """This step's key and value of every row, [sources, heads, beams, head_dim], into the next columns."""
        if self.length + self.beams > self.keys.shape[2]:  # a slice past the end would write nothing, silently
            raise ValueError(f"DecodingCache is full: {self.keys.shape[2]} key positions")
        self.keys[:, :, self.length : self.length + self.beams] = key
        self.values[:, :, self.length : self.length + self.beams] = value
        self.length += self.beams

    def keep_sources(self, sources: paddle.Tensor):
        self.keys, self.values = paddle.index_select(self.keys, sources), paddle.index_select(self.values, sources)

    def insert_columns(self, at: int, columns: int):
        """`columns` empty columns before column `at` (memory widened, or room for more steps at the end)."""
        self.keys, self.values = [
            paddle.concat([t[:, :, :at], _zeros_like_columns(t, columns), t[:, :, at:]], axis=2)
            for t in (self.keys, self.values)
        ]
        if at < self.length:  # inserted among the written columns (at the front: a wider memory)
            self.length += columns

    def drop_columns(self, start: int, end: int):
        self.keys, self.values = [paddle.concat([t[:, :, :start], t[:, :, end:]], axis=2) for t in (self.keys, self.values)]
        self.length -= end - start

    def append_sources(self, memory: LayerCache, memory_columns: int):
        """New sources' memories [S2, heads, m, head_dim], left-padded into `memory_columns`, nothing written
        after them."""
        width = self.keys.shape[2]
        parts = []
        for old, new in zip((self.keys, self.values), memory):
            pad_front = memory_columns - new.shape[2]
            pieces = ([_zeros_like_columns(new, pad_front)] if pad_front else []) + [new]
            pieces.append(_zeros_like_columns(new, width - memory_columns))
            parts.append(paddle.concat([old, paddle.concat(pieces, axis=2)], axis=0))
        self.keys, self.values = parts


class DecodingMask(StepMask):
    """Which columns of the DecodingCache each row sees, as the additive bias [rows, columns] every layer adds
    to its scores (handed out as [sources, 1, beams, columns]): its source's memory (not padding) and the
    columns its own history wrote. Row s * beams + j is beam j of source s. A beam reorder moves rows of it."""

    def __init__(self, memory_valid: np.ndarray, beams: int, capacity: int):
        """memory_valid: bool [sources, memory], False at padding."""
        self.beams = beams
        self.bias = paddle.assign(self._rows(memory_valid, memory_valid.shape[1] + beams * capacity))
        self.own_slot = paddle.assign(self._own_slot(memory_valid.shape[0]))  # to_tensor leaks (as_tensor, below)

    def _rows(self, memory_valid, width):
        rows = np.full([memory_valid.shape[0] * self.beams, width], MASKED_SCORE, dtype="float32")
        rows[:, : memory_valid.shape[1]] = np.where(np.repeat(memory_valid, self.beams, axis=0), 0.0, MASKED_SCORE)
        return rows

    def _own_slot(self, sources):
        rows = sources * self.beams
        own = np.full([rows, self.beams], MASKED_SCORE, dtype="float32")
        own[np.arange(rows), np.arange(rows) % self.beams] = 0.0  # beam j writes column j of each step
        return own

    def advance(self, start: int):
        """Before a step: each row also sees the column its new token's key and value go to."""
        if start + self.beams > self.bias.shape[1]:
            raise ValueError(f"DecodingMask is full: {self.bias.shape[1]} key positions")
        self.bias[:, start : start + self.beams] = self.own_slot

    def select(self, rows: paddle.Tensor):
        """Row i continues row rows[i] (of the same source): it sees what that row saw."""
        self.bias = paddle.index_select(self.bias, rows)
        if self.own_slot.shape[0] != rows.shape[0]:
            self.own_slot = self.own_slot[: rows.shape[0]]  # the pattern repeats every `beams` rows

    def insert_columns(self, at: int, columns: int):
        masked = paddle.full([self.bias.shape[0], columns], MASKED_SCORE, dtype="float32")
        self.bias = paddle.concat([self.bias[:, :at], masked, self.bias[:, at:]], axis=1)

    def drop_columns(self, start: int, end: int):
        self.bias = paddle.concat([self.bias[:, :start], self.bias[:, end:]], axis=1)

    def append_sources(self, memory_valid: np.ndarray, memory_columns: int):
        pad_front = memory_columns - memory_valid.shape[1]
        padded = np.concatenate([np.zeros([memory_valid.shape[0], pad_front], dtype=bool), memory_valid], axis=1)
        self.bias = paddle.concat([self.bias, paddle.assign(self._rows(padded, self.bias.shape[1]))], axis=0)
        self.own_slot = paddle.assign(self._own_slot(self.bias.shape[0] // self.beams))

    def layer_bias(self):
        rows, keys = self.bias.shape
        return self.bias.reshape([rows // self.beams, 1, self.beams, keys])


class DecodingBatch:
    """The caches (one per layer) and the mask of sources decoding `beams` rows each, with the columns'
    bookkeeping: memory width, steps written, the step each source joined at.

    Each step writes the same columns for every row, so every source in the batch must step together; a
    source that stops stepping leaves (`keep_sources`). Room for steps grows as sources join; columns of
    steps before every live source joined are dropped when they pile up."""

    def __init__(self, memory: List[LayerCache], memory_valid: np.ndarray, beams: int, capacity: int):
        self.beams, self.memory = beams, memory_valid.shape[1]
        self.caches = [DecodingCache(layer, beams, capacity) for layer in memory]
        self.mask = DecodingMask(memory_valid, beams, capacity)
        self.steps = 0  # steps written
        self.joined = np.zeros(memory_valid.shape[0], dtype="int64")  # per source: the step it joined at

    @property
    def sources(self) -> int:
        return len(self.joined)

    def _columns(self) -> int:
        return self.mask.bias.shape[1]

    def _insert_columns(self, at, columns):
        for cache in self.caches:
            cache.insert_columns(at, columns)
        self.mask.insert_columns(at, columns)

    def join(self, memory: List[LayerCache], memory_valid: np.ndarray, capacity: int):
        """Adds sources (their rows after the existing ones) that will step from the next step on, at most
        `capacity` steps."""
        self._drop_dead_steps()
        if memory_valid.shape[1] > self.memory:  # widen every source's memory on the left
            self._insert_columns(0, memory_valid.shape[1] - self.memory)
            self.memory = memory_valid.shape[1]
        room = self.steps + capacity - (self._columns() - self.memory) // self.beams
        if room > 0:
            self._insert_columns(self._columns(), self.beams * max(room, 32))  # 32 steps' slack: fewer copies
        for cache, layer in zip(self.caches, memory):
            cache.append_sources(layer, self.memory)
        self.mask.append_sources(memory_valid, self.memory)
        count = memory_valid.shape[0]
        self.joined = np.concatenate([self.joined, np.full(count, self.steps, dtype="int64")])

    def _drop_dead_steps(self):
        """Drops the columns of steps no live source sees, once they are as many as DEAD_STEPS_KEPT."""
        dead = int(self.joined.min()) if self.sources else self.steps
        if dead >= DEAD_STEPS_KEPT:
            start = self.memory
            for cache in self.caches:
                cache.drop_columns(start, start + dead * self.beams)
            self.mask.drop_columns(start, start + dead * self.beams)
            self.steps -= dead
            self.joined -= dead

    def advance(self):
        """Before a step's forward: every row sees the column it is about to write."""
        self.mask.advance(self.memory + self.steps * self.beams)
        self.steps += 1

    def select(self, rows: np.ndarray, keep: np.ndarray = None):
        """Row i continues row rows[i] (an index of the current rows, within the same source); `keep`: per
        source whether it stays (default: all do), `rows` then naming only the staying sources' rows."""
        if keep is not None and not keep.all():
            index = as_tensor(np.flatnonzero(keep).astype("int64"))
            for cache in self.caches:
                cache.keep_sources(index)
            self.joined = self.joined[keep]
        elif np.array_equal(rows, np.arange(len(rows))):
            return  # nothing moved
        self.mask.select(as_tensor(rows.astype("int64")))


class DecodingCacheGroup(StepCache):
    """Several DecodingCaches of one layer (batches of different beam widths) stepped by one forward: their
    rows, concatenated in order, go through every weight matmul together; attention runs per cache over its
    own keys, under the matching bias of a DecodingMaskGroup."""

    def __init__(self, caches: List[DecodingCache]):
        self.caches = caches

    @property
    def memory_length(self) -> int:
        return max(cache.memory_length for cache in self.caches)

    def attend(self, attention, qkv, bias):
        contexts, start = [], 0
        for part, part_bias in zip(self.caches, bias):
            end = start + part.keys.shape[0] * part.beams
            contexts.append(part.attend(attention, qkv[start:end], part_bias))
            start = end
        return paddle.concat(contexts)


class DecodingMaskGroup(StepMask):
    """The DecodingMasks of a DecodingCacheGroup's caches, in the same order."""

    def __init__(self, masks: List[DecodingMask]):
        self.masks = masks

    def layer_bias(self):
        return [mask.layer_bias() for mask in self.masks]


def as_tensor(array):
    """A NumPy array as a Paddle tensor, by paddle.assign: Paddle 3.3.1's paddle.to_tensor and the
    paddle.Tensor constructor each leave one Python object behind per call (gc finds it without a
    referrer), a few per decoding step, which a long-running server accumulates; assign leaves none
    and costs ~10 us more per call."""
    return paddle.assign(np.ascontiguousarray(array))

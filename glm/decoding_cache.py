"""The key/value cache GLM decodes over, one new token per row a step, and the mask that says which of its
keys each row sees (glm/generation.py drives them; GLMAttention reads and writes them). Beams of one source
share its memory; a beam reorder moves rows of the mask, never keys. A group of them steps several
sources (different lengths, beam widths) through one forward: glm/serving's continuous batching.
"""

from typing import List, Tuple

import numpy as np
import paddle

__all__ = ["MASKED_SCORE", "LayerCache", "DecodingCache", "DecodingMask", "DecodingCacheGroup", "DecodingMaskGroup"]

# Added to masked scores. Scores are always float32 when the bias is added (manual path), so this never
# meets float16; the fused path scales it to the compute dtype (see `_fused_mask_value`).
MASKED_SCORE = -1e9

LayerCache = Tuple[paddle.Tensor, paddle.Tensor]  # (keys, values), each [B, heads, M, head_dim]


class DecodingCache:
    """One layer's keys and values while decoding `beams` rows per source, one new token per row a step
    (glm/generation.py drives it; GLMAttention._decoding_attention reads and writes it).

    Per source one buffer [B, heads, M + beams * capacity, head_dim]: the memory (source, earlier answers,
    <|startofpiece|>), which a source's beams share, then one slot per step and beam, where that step's
    row writes its key and value. Keys never move: which slots a row sees (its own history) is the
    DecodingMask's business, so a beam reorder copies no keys, and a source's beams attend together as one
    small matrix over the whole buffer (unwritten and other beams' slots are masked out).
    """

    def __init__(self, memory: LayerCache, beams: int, capacity: int):
        keys, values = memory
        sources, heads, length, head_dim = keys.shape
        slots = paddle.zeros([sources, heads, beams * capacity, head_dim], dtype=keys.dtype)
        self.keys, self.values = paddle.concat([keys, slots], axis=2), paddle.concat([values, slots], axis=2)
        self.beams, self.length = beams, length

    @property
    def memory_length(self) -> int:  # key positions written so far: memory + beams x steps
        return self.length

    def write(self, key, value):
        """This step's key and value of every row, [B, heads, beams, head_dim], into the next free slots."""
        if self.length + self.beams > self.keys.shape[2]:  # a slice past the end would write nothing, silently
            raise ValueError(f"DecodingCache is full: {self.keys.shape[2]} key positions")
        self.keys[:, :, self.length : self.length + self.beams] = key
        self.values[:, :, self.length : self.length + self.beams] = value
        self.length += self.beams

    def keep_sources(self, sources: paddle.Tensor):
        """Drops finished sources: keeps the buffers of `sources`."""
        self.keys, self.values = paddle.index_select(self.keys, sources), paddle.index_select(self.values, sources)


class DecodingMask:
    """Which keys of the DecodingCache each decoding row sees: its source's memory (not its padding) and the
    slots its own history wrote. Row b * beams + j is beam j of source b. Held as the additive bias
    [rows, keys] every layer adds to its scores (`attention_bias` hands it out as [B, 1, beams, keys]), so a
    step updates one small tensor for all layers and a beam reorder moves rows of it, not keys.
    """

    def __init__(self, memory_valid: np.ndarray, beams: int, capacity: int):
        """memory_valid: bool [B, M], False at padding."""
        sources, memory = memory_valid.shape
        rows = sources * beams
        bias = np.full([rows, memory + beams * capacity], MASKED_SCORE, dtype="float32")
        bias[:, :memory] = np.where(np.repeat(memory_valid, beams, axis=0), 0.0, MASKED_SCORE)
        own_slot = np.full([rows, beams], MASKED_SCORE, dtype="float32")
        own_slot[np.arange(rows), np.arange(rows) % beams] = 0.0  # beam j writes slot j of each step
        self.bias, self.own_slot = paddle.assign(bias), paddle.assign(own_slot)  # to_tensor leaks (glm.generation._tensor)
        self.memory, self.beams, self.steps = memory, beams, 0

    def advance(self):
        """Before a step: each row also sees the slot its new token's key and value are written to."""
        start = self.memory + self.steps * self.beams
        if start + self.beams > self.bias.shape[1]:
            raise ValueError(f"DecodingMask is full: {self.bias.shape[1]} key positions")
        self.bias[:, start : start + self.beams] = self.own_slot
        self.steps += 1

    def select(self, rows: paddle.Tensor):
        """Row i continues row rows[i] (of the same source; finished sources' rows left out): it sees what that
        row saw."""
        self.bias = paddle.index_select(self.bias, rows)
        self.own_slot = self.own_slot[: len(rows)]  # the pattern repeats every `beams` rows

    def layer_bias(self):
        rows, keys = self.bias.shape
        return self.bias.reshape([rows // self.beams, 1, self.beams, keys])


class DecodingCacheGroup:
    """Several sources' DecodingCaches of one layer (different memory lengths, beam widths and generated
    counts: glm/serving's continuous batching) stepped by one forward: their rows, concatenated in order,
    go through every weight matmul together; attention runs per cache over its own keys, under the
    matching DecodingMask of a DecodingMaskGroup."""

    def __init__(self, caches: List[DecodingCache]):
        self.caches = caches

    @property
    def memory_length(self) -> int:
        return max(cache.memory_length for cache in self.caches)


class DecodingMaskGroup:
    """The DecodingMasks of a DecodingCacheGroup's caches, in the same order."""

    def __init__(self, masks: List[DecodingMask]):
        self.masks = masks

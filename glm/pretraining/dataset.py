"""The pretraining stream: sample i is window i of the corpus (windows.py), and the batch that starts at
sample i is built with a generator seeded by (seed, i) (objective.py). Every example is a pure function of
(corpus, flags, seed, sample index), and sample indices are positions in the stream the Trainer's
sequential sampler walks (PaddleNLP's DistributedBatchSampler, which a resumed run starts at the consumed
samples): a resumed run builds exactly the batches the uninterrupted one would, on any number of workers.
"""

import math
from itertools import count
from typing import Dict, Iterator, List, Sequence

import numpy as np
from paddle.io import Dataset

from ..inputs import collate_examples

from .objective import OBJECTIVES, BlankInfillingBuilder, PretrainingExample
from .windows import WindowSampler

__all__ = ["PretrainingDataset", "BatchCollator", "training_examples", "held_out_examples"]

BATCH_STREAM, HELD_OUT_STREAM = 1, 2  # generator seeds [seed, stream, ...], apart from the windows' [seed, index]


class PretrainingDataset(Dataset):
    """`length` samples: {"index": i, "window": window i}. An epoch (`samples_per_epoch`) is one pass of
    windows over the corpus: its tokens, each document with its [CLS] and <|endoftext|>."""

    def __init__(self, windows: WindowSampler, length: int):
        super().__init__()
        self.windows, self.length = windows, length
        self.samples_per_epoch = math.ceil(windows.corpus.window_tokens / windows.seq_length)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return {"index": int(index), "window": self.windows.window(int(index))}


class BatchCollator:
    """The Trainer's collate_fn: a batch's examples (one objective draw per batch, as THUDM), padded."""

    def __init__(self, builder: BlankInfillingBuilder, seed: int, pad_id: int):
        self.builder, self.seed, self.pad_id = builder, seed, pad_id

    def examples(self, samples: Sequence[dict]) -> List[PretrainingExample]:
        rng = np.random.default_rng([self.seed, BATCH_STREAM, samples[0]["index"]])
        return self.builder.build_batch([sample["window"] for sample in samples], rng)

    def __call__(self, samples: Sequence[dict]) -> Dict[str, np.ndarray]:
        return collate_examples([example.features() for example in self.examples(samples)], self.pad_id)


def training_examples(dataset: PretrainingDataset, collator: BatchCollator, batch_size: int) -> Iterator[PretrainingExample]:
    """The examples one process training with `batch_size` rows a batch sees, in order (--dump_examples)."""
    for batch in count():
        yield from collator.examples([dataset[i] for i in range(batch * batch_size, (batch + 1) * batch_size)])


def held_out_examples(windows: WindowSampler, builder: BlankInfillingBuilder, seed: int, size: int
                      ) -> Dict[str, List[PretrainingExample]]:
    """Per objective, examples of the first `size` held-out windows, each with its own draw and no short
    pieces: the same set at every evaluation whatever the batch size. A window that cannot hold the token or
    sentence blanks is left out of that objective's set."""
    sets = {}
    for number, objective in enumerate(OBJECTIVES):
        sets[objective] = [
            example
            for index in range(size)
            for example in builder.build([windows.window(index)], objective,
                                         np.random.default_rng([seed, HELD_OUT_STREAM, number, index]))
        ]
    return sets

"""One request's decoding as the event loop sees it: its sources in the engine, and their answers arriving
as events on an asyncio queue (the engine's thread hands them over with loop.call_soon_threadsafe, so the
loop never waits on the model)."""

import asyncio
import time
from typing import List, Optional, Sequence

from ..generation import GenerationConfig
from .engine import Engine, Source, SourceListener
from .text import AnswerText

__all__ = ["Generation", "Ended"]


class Ended(Exception):
    """A source stopped without its answer: `reason` is timeout, shutdown, or a failure's message."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Listener(SourceListener):
    """On the engine's thread, between a source's steps: tokens to text pieces (greedy and sampling only: beams reorder, so a beam
    answer is known when its blank is decided), forwarded to the loop."""

    def __init__(self, generation: "Generation", index: int, decode, config: GenerationConfig, pad: int):
        self.generation, self.index, self.decode, self.pad = generation, index, decode, pad
        self.copies = config.num_return_sequences
        self.streams = config.decode_strategy != "beam_search"
        self.answers = [AnswerText(decode) for _ in range(self.copies)]

    def tokens(self, tokens):
        if not self.streams:
            return
        for copy, token in enumerate(tokens[: self.copies]):
            if token != self.pad:  # a finished copy is fed padding
                piece = self.answers[copy].add(token)
                self.generation._put(("piece", self.index, copy, piece))

    def blank_done(self, blank, answers):
        rests = [text.finish(tokens) for text, tokens in zip(self.answers, answers)]
        self.generation._put(("blank", self.index, blank, rests, [len(tokens) for tokens in answers]))
        self.answers = [AnswerText(self.decode) for _ in range(self.copies)]

    def finished(self, blanks):
        self.generation._put(("done", self.index))

    def ended(self, reason):
        self.generation._put(("ended", self.index, reason))


class Generation:
    """The sources of one request (one per prompt) and the events of their answers, in order per source:

        ("piece", source, copy, text)                 greedy/sampling: the next piece of the current blank
        ("blank", source, blank, rests, token_counts)  per copy, the rest of the blank's answer (all of it for beams)
        ("done", source)                               every blank answered

    A source that ends early raises Ended from `events()`, except one cancelled with "stop" (its client's
    stop strings were met), which is done."""

    def __init__(self, engine: Engine, sources: Sequence[List[int]], config: GenerationConfig, decode, pad: int,
                 time_limit: float):
        self.engine, self.config = engine, config
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = time.monotonic()
        self.first_piece: Optional[float] = None  # when the first text (or beam answer) arrived
        deadline = self.started + time_limit
        self.sources = [
            Source(ids, config, _Listener(self, index, decode, config, pad), deadline) for index, ids in enumerate(sources)
        ]

    def submit(self):
        self.engine.submit(self.sources)

    def cancel(self, reason: str, source: Optional[int] = None):
        for index, item in enumerate(self.sources):
            if source is None or index == source:
                item.cancel(reason)

    def _put(self, event):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self):
        remaining = len(self.sources)
        while remaining:
            event = await self.queue.get()
            if event[0] == "ended" and event[2] != "stop":
                self.cancel(event[2])
                raise Ended(event[2])
            if event[0] in ("piece", "blank") and self.first_piece is None:
                self.first_piece = time.monotonic()
            if event[0] in ("done", "ended"):
                remaining -= 1
                event = ("done", event[1])
            yield event

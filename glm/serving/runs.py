"""One request's decoding as the event loop sees it: its sources in the engine, and their answers arriving
as events on an asyncio queue. The engine's thread only records raw tokens (`_Listener`); handing them over
costs it one deque append, and one loop.call_soon_threadsafe wakes the loop for everything recorded since
the engine last said its events were ready (`Outbox`). Tokens become text pieces on the loop's side, in `Generation.events`."""

import asyncio
import collections
import time
from typing import List, Optional, Sequence

from ..generation import GenerationConfig
from .engine import ENGINE_PREFIX, Engine, Source, SourceListener
from .text import AnswerText

__all__ = ["Generation", "Ended", "Outbox"]


class Ended(Exception):
    """A source stopped without its answer: `reason` is timeout, shutdown, or a failure's message."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Outbox:
    """Events from the engine's thread to asyncio queues on one loop: `put` only appends; `flush` (the engine
    calls it once a round, and once more when a round's new searches have chosen their first tokens) wakes the
    loop once for everything pending. A call_soon_threadsafe per
    event was a fifth of the engine thread's time under 16 streaming clients: each wake-up hands the GIL to
    the loop's thread and back."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending = collections.deque()
        self.scheduled = False

    def put(self, queue: asyncio.Queue, event):
        self.pending.append((queue, event))

    def flush(self):
        if self.pending and not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self):
        self.scheduled = False  # before draining: an event appended from now on schedules another delivery
        while self.pending:
            queue, event = self.pending.popleft()
            queue.put_nowait(event)


class _Listener(SourceListener):
    """On the engine's thread, between a source's steps: records what the source reports, as is."""

    def __init__(self, generation: "Generation", index: int, config: GenerationConfig):
        self.generation, self.index = generation, index
        self.copies = config.num_return_sequences
        self.streams = config.decode_strategy != "beam_search"  # beams reorder: an answer is known when decided

    def tokens(self, tokens):
        if self.streams:
            self.generation._put(("tokens", self.index, tokens[: self.copies].tolist()))

    def blank_done(self, blank, answers):
        self.generation._put(("blank", self.index, blank, answers))

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
                 time_limit: float, outbox: Outbox, prefix=ENGINE_PREFIX):
        self.engine, self.config, self.decode, self.pad, self.outbox = engine, config, decode, pad, outbox
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = time.monotonic()
        self.first_piece: Optional[float] = None  # when the first text (or beam answer) arrived
        deadline = self.started + time_limit
        self.sources = [
            Source(ids, config, _Listener(self, index, config), deadline, prefix=prefix) for index, ids in enumerate(sources)
        ]
        # per source, per copy: the text of the blank being answered, as its tokens arrive (greedy and sampling)
        self.answers = [self._new_answers() for _ in sources]

    def submit(self):
        self.engine.submit(self.sources)

    def cancel(self, reason: str, source: Optional[int] = None):
        for index, item in enumerate(self.sources):
            if source is None or index == source:
                item.cancel(reason)

    def _new_answers(self):
        return [AnswerText(self.decode) for _ in range(self.config.num_return_sequences)]

    def _put(self, event):
        self.outbox.put(self.queue, event)

    async def events(self):
        remaining = len(self.sources)
        while remaining:
            event = await self.queue.get()
            kind, source = event[0], event[1]
            if kind == "ended" and event[2] != "stop":
                self.cancel(event[2])
                raise Ended(event[2])
            if kind == "tokens":  # to text pieces: a token ending inside a character adds none yet
                for copy, token in enumerate(event[2]):
                    piece = self.answers[source][copy].add(token) if token != self.pad else ""  # a finished copy gets padding
                    if piece:
                        self.first_piece = self.first_piece or time.monotonic()
                        yield ("piece", source, copy, piece)
                continue
            if kind == "blank":
                answers = event[3]
                rests = [text.finish(tokens) for text, tokens in zip(self.answers[source], answers)]
                self.answers[source] = self._new_answers()
                self.first_piece = self.first_piece or time.monotonic()
                event = ("blank", source, event[2], rests, [len(tokens) for tokens in answers])
            if kind in ("done", "ended"):
                remaining -= 1
                event = ("done", source)
            yield event

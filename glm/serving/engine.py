"""The continuous-batching decode loop: one thread owns the model; requests join the running batch at the
next step and leave the moment they finish.

Every source (one prompt of a request) is decoded by the project's own `GLMGenerator.generate`, the code
predict_generation.py runs, in a greenlet of its own on the engine's thread, through a ModelRunner of the
engine's (`_EngineRunner`): its model calls do not run the model, they switch back to the engine with the
call. The engine resumes the sources one at a time (a switch costs about a microsecond), collects the model
call each one is waiting on, and then runs them:

  * encoding sources, `<|startofpiece|>` and the answers put into memory between blanks: the calls of a
    round of the same kind as one forward (ModelRunner.extend_many, left-padded); a call alone exactly as
    predict with --batch_size 1 runs it;
  * a blank's decoding: generate hands the engine the blank's search (glm/search.py) and waits until it
    has ended. Per step the engine runs ONE forward for the rows of every decoding source, whatever its
    strategy, beam width, memory length or generated count, then ONE `advance_searches` call for all their
    searches: the logit processors over all rows at once, one argmax for every greedy row, one top-k for
    beam sources of a width, sampling from each source's own generator. No greenlet switch per step. The
    rows of all sources with the same rows per source (beams or copies) live in one shared DecodingBatch
    (glm/decoding_cache.py): a source joins it when its blank starts, its memory left-padded into the
    batch's, and leaves when its search ends, so attention runs once per width for all sources.

From the first request on, the weights are packed once for `max_rows` rows (ModelRunner.packed_weights).

So the search (processors, candidates, beam hypotheses) is predict's, not a copy. Batched with others, a
source's weight matmuls see more rows and its attention runs over padded keys (masked, adding exact zeros),
which can move the last float bits of its log-probabilities: the answer changes only if two candidates tie
to that precision.
"""

import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import paddle
from greenlet import greenlet
from paddlenlp.utils.log import logger

from ..decoding_cache import DecodingBatch, joined_memories
from ..generation import GenerationConfig, GLMGenerator, rows_per_source
from ..model_runner import ModelRunner, extend_kind
from ..search import Move, advance_searches

__all__ = ["Engine", "Source", "SourceListener", "Cancelled", "QueueFull", "ENGINE_PREFIX"]


class Cancelled(Exception):
    """Raised inside a source's generate to end it: the client left, a stop string was met, time ran out."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class QueueFull(Exception):
    """The engine's queue holds its maximum of waiting requests."""


class SourceListener:
    """What a source reports, called on the engine's thread between its steps (keep it short)."""

    def tokens(self, tokens: np.ndarray):
        """The tokens just chosen for this source's rows (one per row; greedy/sampling rows are the answer
        copies, beam rows the beams), before they are fed to the model."""

    def blank_done(self, blank: int, answers: List[List[int]]):
        """A blank's final answers (num_return_sequences token lists, best first)."""

    def finished(self, blanks: List[List[List[int]]]):
        """generate's result for the source: per blank, its answers."""

    def ended(self, reason: str):
        """The source stopped early (Cancelled.reason) or failed (the error's message): no result follows."""


ENGINE_PREFIX = "the engine's"  # Source.prefix: the prefix of the engine's generator, if it has one


@dataclass
class Source:
    """One prompt of a request: its token ids, its decoding settings and who listens."""

    ids: List[int]
    config: GenerationConfig
    listener: SourceListener
    deadline: float = float("inf")  # time.monotonic() after which it is cancelled ("timeout")
    # The P-tuning v2 prefix it decodes after (glm/prefix.py): the engine's generator's (ENGINE_PREFIX), or
    # another GLMPrefixModel on the same base, or None for none. Sources with and without step together.
    prefix: object = field(default=ENGINE_PREFIX)
    cancel_reason: Optional[str] = None
    # engine state
    _greenlet: Optional[greenlet] = field(default=None, repr=False)
    _job: Optional[tuple] = field(default=None, repr=False)
    _result: object = field(default=None, repr=False)
    _ready: bool = field(default=False, repr=False)  # the model call it waits on has run: its result is set
    _done: bool = field(default=False, repr=False)

    @property
    def rows(self) -> int:
        return rows_per_source(self.config)

    def cancel(self, reason: str):
        """Ends the source at its next step (from any thread)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason


class _EngineRunner(ModelRunner):
    """The ModelRunner of one served source's GLMGenerator: `extend` hands the call to the engine (the source's
    greenlet waits for the result), `start_rows` joins the engine's shared batch of the blank's width."""

    def __init__(self, engine: "Engine", source: Source):
        super().__init__(engine.runner.model)
        self.prefix = engine.runner.prefix if source.prefix is ENGINE_PREFIX else source.prefix
        self.engine, self.source = engine, source

    def packed_weights(self, rows):
        return contextlib.nullcontext()  # the engine packs the weights for all its rows

    def extend(self, *args):
        return self.engine._call(self.source, ("extend", args))

    def start_rows(self, cache, memory_valid, mask_positions, copies, capacity):
        rows = _SourceRows(self.engine, self.source, mask_positions[0], copies)
        self.engine._shared(copies).join(rows, cache, memory_valid, capacity)
        return rows


class _SourceRows:
    """One source's rows in a shared batch, as generate sees DecodingRows: `decode` hands the blank's search to
    the engine, which advances the searches of all sources at once (glm.search.advance_searches) and steps
    every source's rows together; the source's generate resumes when its search has ended."""

    def __init__(self, engine: "Engine", source: Source, mask_position: int, copies: int):
        self.engine, self.source, self.copies = engine, source, copies
        self.mask_position, self.generated = int(mask_position), 0
        self.search = None  # the blank's search (glm/search.py), while it runs
        self.tokens: Optional[np.ndarray] = None  # the next step's tokens, until the step runs
        self.order: Optional[np.ndarray] = None  # a pending reorder of its rows

    def decode(self, search, logprobs):
        self.search = search
        self.engine._joining.append((self, logprobs))  # its first choice, made before this round's step
        return self.engine._call(self.source, ("decode", self))

    def move(self, move):
        """Applies the search's move: the rows' reorder and the tokens the next step feeds."""
        if not np.array_equal(move.rows, np.arange(len(move.rows))):
            self.order = move.rows if self.order is None else self.order[move.rows]
        # a source's generate has one source: it stays until its search ends (move.keep is all True)
        self.tokens = move.tokens
        self.generated += 1
        self.source.listener.tokens(move.tokens)

    def leave(self):
        """Steps no more: its search ended or its source was cancelled."""
        self.search = self.tokens = None

    def end(self, result):
        """Its search ended (`result` None) or failed (the error): it leaves, and its source's generate goes on
        from `decode` with that result at the next resume."""
        self.leave()
        self.source._result, self.source._ready = result, True

    def positions(self):
        return np.tile([[self.mask_position, self.generated + 1]], (self.copies, 1))


class _SharedBatch:
    """The engine's DecodingBatch for sources of one width (`copies` rows each), with its members in row order.
    Every member steps at every step; one that did not ask to step leaves before the step runs. Members that
    join in a round enter the batch together before its step: one copy of the batch's caches for all of them
    (a join each was ~1 ms of Paddle ops per source, 18 ms of the round 15 tiny requests arrived in)."""

    def __init__(self, copies: int):
        self.copies = copies
        self.batch: Optional[DecodingBatch] = None
        self.members: List[_SourceRows] = []
        self._joining = []  # (cache, memory_valid, capacity) of members not yet in the batch, in member order

    def join(self, rows: _SourceRows, cache, memory_valid, capacity):
        self.members.append(rows)
        self._joining.append((cache, memory_valid, capacity))

    def _enter_joining(self):
        joining, self._joining = self._joining, []
        if not joining:
            return
        cache, valid = joined_memories([(cache, valid) for cache, valid, _ in joining])
        capacity = max(capacity for _, _, capacity in joining)
        if self.batch is None:
            self.batch = DecodingBatch(cache, valid, self.copies, capacity)
        else:
            self.batch.join(cache, valid, capacity)

    def settle(self) -> List[_SourceRows]:
        """Enters the members that joined, applies leaving members and pending reorders; returns the members
        stepping now, in row order."""
        self._enter_joining()
        keep = np.array([member.tokens is not None for member in self.members], dtype=bool)
        if not keep.any():
            self.batch, self.members = None, []
            return []
        rows = np.concatenate([index * self.copies + (member.order if member.order is not None else np.arange(self.copies))
                               for index, member in enumerate(self.members) if member.tokens is not None])
        self.batch.select(rows, keep)
        self.members = [member for member in self.members if member.tokens is not None]
        for member in self.members:
            member.order = None
        return self.members


class Engine:
    """Owns the model through `generator` (the Predictor's GLMGenerator) and decodes every admitted source.

    max_rows: decoding rows (beams, or answer copies, summed over sources) in the batch; a request that would
    exceed them waits, unless nothing decodes (then it runs alone). max_queue: requests waiting; one more is
    refused with QueueFull. `on_step(rows)` is called after each batched step (metrics); `events_ready()`
    whenever the listeners' events recorded so far can be delivered (the server delivers them): once the
    searches started in a round have chosen their first tokens, before the round's step, and after each round."""

    def __init__(self, generator: GLMGenerator, max_rows: int = 64, max_queue: int = 64,
                 on_step: Optional[Callable[[int], None]] = None):
        self.generator, self.runner = generator, generator.runner
        self.max_rows, self.max_queue = max_rows, max_queue
        self.on_step = on_step
        self.events_ready: Optional[Callable[[], None]] = None
        self._lock = threading.Condition()
        self._queue = collections.deque()  # requests (lists of sources) not yet decoding
        self._live: List[Source] = []
        self._exclusive = collections.deque()  # (function, callback): other uses of the model, between steps
        self._stopping = False
        self._thread = None
        self._pack = contextlib.ExitStack()  # holds the runner's packed weights while sources decode
        self._batches = {}  # rows per source -> _SharedBatch
        self._joining: List[tuple] = []  # (rows, first log-probabilities) of the searches started this round

    # -- what the server calls (any thread) ---------------------------------------------------------------

    def submit(self, sources: Sequence[Source]):
        """Queues a request's sources; they join the batch together at a coming step."""
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self.queue_depth >= self.max_queue:
                raise QueueFull(f"{self.queue_depth} requests are waiting (the queue's maximum)")
            self._queue.append(list(sources))
            self._lock.notify_all()

    def run_exclusive(self, function: Callable[[], object], callback: Callable[[object, Optional[BaseException]], None]):
        """Runs `function()` on the model thread between two steps; `callback(result, error)` there after.
        It waits in the same bounded queue as the requests (QueueFull when full)."""
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self.queue_depth >= self.max_queue:
                raise QueueFull(f"{self.queue_depth} requests are waiting (the queue's maximum)")
            self._exclusive.append((function, callback))
            self._lock.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + len(self._exclusive)

    @property
    def live_rows(self) -> int:
        return sum(source.rows for source in self._live)

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="glm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0, wait: bool = True):
        """Cancels what still decodes or waits ("shutdown": each source's listener is told) and ends the loop;
        `wait`: until the loop's thread has ended (at most `timeout` seconds)."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if wait and self._thread is not None:
            self._thread.join(timeout)

    # -- the loop -----------------------------------------------------------------------------------------

    def _loop(self):
        while True:
            try:
                if not self.run_once(wait=0.5):
                    return
            except Exception as error:  # noqa: BLE001  (a bug here must not leave every request waiting)
                logger.error(f"engine step failed: {type(error).__name__}: {error}")
                for source in self._live:
                    source.cancel(f"engine error: {error}")
            finally:
                self._events_ready()

    @paddle.no_grad()
    def run_once(self, wait: float = 0.0) -> bool:
        """One step of every admitted source (after admitting what fits); False once stopped and empty.
        The server's thread calls it in a loop; tests call it directly to place arrivals at chosen steps."""
        with self._lock:
            if not self._live and not self._queue and not self._exclusive and not self._stopping:
                self._lock.wait(wait)
            # One other use of the model between two steps: a queue of them never holds the batch up for long.
            exclusive = [self._exclusive.popleft()] if self._exclusive else []
            if self._stopping:
                for request in self._queue:
                    for source in request:
                        source.listener.ended("shutdown")
                self._queue.clear()
                for source in self._live:
                    source.cancel("shutdown")
            else:
                self._admit()
        for function, callback in exclusive:
            try:
                result, error = function(), None
            except Exception as exc:  # noqa: BLE001  (reported to the caller, the loop goes on)
                result, error = None, exc
            callback(result, error)
        now = time.monotonic()
        if self._live:
            self._pack_weights()
        for source in list(self._live):
            if now > source.deadline:
                source.cancel("timeout")
        # Resumed: new sources, and those whose model call ran (or that are cancelled); one whose extend is
        # still to run (more calls than a round's passes) waits for the passes below.
        self._resume_all([s for s in self._live if s._greenlet is None or s._ready or s.cancel_reason is not None])
        # A new prompt's encode, its <|startofpiece|> and its first step all run in the round that admits it (so
        # do an answer put into memory and the next blank's start): resumed after each extend, up to 3 passes.
        for _ in range(3):
            extended = self._run_extends(self._live)
            if not extended:
                break
            self._resume_all(extended)
            if self._joining:
                self._resume_all(self._choose_first())  # a search that ended at once: its source goes on now
                self._events_ready()  # first tokens go out now, not after the step
        if self._live:
            self._run_step()
        else:
            self._batches.clear()  # members left with their sources
        if self._stopping and not self._live:
            self._pack.close()
            return False
        return True

    def _events_ready(self):
        if self.events_ready is not None:
            self.events_ready()

    def _pack_weights(self):
        """Packs the weights for up to max_rows rows when the first source starts (their generate uses the
        engine's runner through theirs) and keeps them until the engine stops. The packs are a copy of the
        weights (1.4 GB for glm-large-chinese), but packing glm-large's vocabulary alone took ~0.12 s on 2
        cores: dropped whenever nothing decoded, it was a quarter of a lone request's latency on the
        glm-large slice. Entered once (`ModelRunner.packing`): where nothing can be packed (a GPU),
        re-entering every round would stack a context a round."""
        if not self.runner.packing:
            self._pack.enter_context(self.runner.packed_weights(self.max_rows))

    def _shared(self, copies: int) -> _SharedBatch:
        return self._batches.setdefault(copies, _SharedBatch(copies))

    def _admit(self):
        now = time.monotonic()
        while self._queue:
            request = self._queue[0]
            if now > min(source.deadline for source in request):
                self._queue.popleft()
                for source in request:
                    source.listener.ended("timeout")
                continue
            rows = sum(source.rows for source in request)
            if self._live and self.live_rows + rows > self.max_rows:
                return
            self._queue.popleft()
            self._live.extend(request)

    def _resume(self, source: Source):
        """Lets `source` run until it waits on its next model call or ends."""
        if source._greenlet is None:
            source._greenlet = greenlet(self._decode)
            source._greenlet.switch(source)
        else:
            if source.cancel_reason is not None:
                source._result = Cancelled(source.cancel_reason)
                if source._job is not None and source._job[0] == "decode":
                    source._job[1].leave()  # its rows leave their batch at the next step
            source._greenlet.switch()

    def _decode(self, source: Source):
        try:
            if source.cancel_reason is not None:
                raise Cancelled(source.cancel_reason)
            generator = self.generator.with_runner(_EngineRunner(self, source))
            on_blank = lambda blank, answers: source.listener.blank_done(blank, answers[0])  # noqa: E731
            blanks = generator.generate([source.ids], source.config, on_blank=on_blank)[0]
            source.listener.finished(blanks)
        except Cancelled as cancelled:
            source.listener.ended(cancelled.reason)
        except Exception as error:  # noqa: BLE001  (one request's failure: reported, the server goes on)
            logger.error(f"decoding failed: {type(error).__name__}: {error}")
            source.listener.ended(f"{type(error).__name__}: {error}")
        finally:
            source._done = True  # returning ends the greenlet: back to the engine

    def _call(self, source: Source, job: tuple):
        """In the source's greenlet: hand `job` to the engine, wait for its result."""
        source._job, source._ready = job, False
        source._greenlet.parent.switch()
        result, source._result, source._job = source._result, None, None
        if isinstance(result, BaseException):
            raise result
        return result

    def _resume_all(self, sources: List[Source]):
        """Resumes each source until its next model call; finished ones leave."""
        for source in list(sources):
            self._resume(source)
            if source._done:
                self._live.remove(source)

    def _run_extends(self, sources: List[Source]) -> List[Source]:
        """Runs the sources' `extend` calls, those of a kind as one forward; returns the sources that ran one."""
        extends = collections.defaultdict(list)  # calls that can share a forward
        for source in sources:
            kind, job = source._job or (None, None)
            if kind == "extend" and not source._ready:
                extends[extend_kind(job)].append(source)
        for group in extends.values():
            try:
                with paddle.no_grad():  # see _step
                    if len(group) == 1:  # alone: exactly predict's call
                        results = [self.runner.extend(*group[0]._job[1])]
                    else:
                        results = self.runner.extend_many([source._job[1] for source in group], self.generator.ids.pad)
            except Exception as error:  # noqa: BLE001  (raised in those sources' generate)
                results = [error] * len(group)
            for source, result in zip(group, results):
                source._result, source._ready = result, True
        return [source for group in extends.values() for source in group]

    def _choose_first(self) -> List[Source]:
        """The first tokens of the searches that started this round (their <|startofpiece|> log-probabilities);
        returns the sources whose search ended at once."""
        joining, self._joining = self._joining, []
        if not joining:
            return []
        return self._choose([member for member, _ in joining], np.concatenate([first for _, first in joining]))

    def _choose(self, members: List[_SourceRows], logprobs: np.ndarray) -> List[Source]:
        """Advances the searches of `members` (their rows' log-probabilities stacked in `logprobs`) as one
        advance_searches call: each member gets its next tokens, or its search ended and its source's generate
        goes on. Returns the sources whose search ended."""
        try:
            moves = advance_searches([member.search for member in members], logprobs)
        except Exception as error:  # noqa: BLE001  (raised in those sources' generate)
            moves = [error] * len(members)
        ended = []
        for member, move in zip(members, moves):
            if isinstance(move, Move):
                member.move(move)
            else:
                member.end(move)
                ended.append(member.source)
        return ended

    def _run_step(self):
        """One step of every source whose rows have tokens to feed, as one forward (the others leave their
        batches), then the next choice of every search."""
        stepping = []
        for shared in list(self._batches.values()):
            members = shared.settle()  # first: it makes or grows the batch for the members that joined
            if members:
                stepping.append((shared.batch, members))
        if not stepping:
            return
        members = [member for _, group in stepping for member in group]
        try:
            logprobs = self._step([batch for batch, _ in stepping], members)
        except Exception as error:  # noqa: BLE001  (raised in those sources' generate)
            for member in members:
                member.end(error)
            return
        for member in members:
            member.tokens = None
        if self.on_step is not None:
            self.on_step(sum(member.copies for member in members))
        self._choose(members, logprobs)

    def _step(self, batches: List[DecodingBatch], members: List[_SourceRows]) -> np.ndarray:
        """One decoding step of every member's rows as one forward: the log-probabilities of all rows, in
        member order."""
        # no_grad here, not only around the loop: the sources' generate calls enter and leave paddle.no_grad
        # interleaved on this one thread, so the mode they restore is not necessarily the loop's.
        with paddle.no_grad():
            tokens = np.concatenate([member.tokens for member in members]).astype("int64")
            positions = np.concatenate([member.positions() for member in members])
            return self.runner.step(batches, tokens, positions)

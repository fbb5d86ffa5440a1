"""The continuous-batching decode loop: one thread owns the model; requests join the running batch at the
next step and leave the moment they finish.

Every source (one prompt of a request) is decoded by the project's own `GLMGenerator.generate`, the code
predict_generation.py runs, in a greenlet of its own on the engine's thread. Its model calls (`_forward`)
do not run the model: they switch back to the engine with the call. The engine resumes the sources one
at a time (a switch costs about a microsecond and no OS scheduling, where a thread per source paid two
thread hand-overs per step), collects the model call each one is waiting on, and then runs them:

  * encoding a source, `<|startofpiece|>` and the answers put into memory between blanks: one forward
    per source, exactly as predict with --batch_size 1 runs it;
  * one decoding step of every source that is decoding, whatever its strategy, beam width, memory length
    or generated count: ONE forward (glm.decoding_cache.DecodingCacheGroup and DecodingMaskGroup: the rows of
    all sources go through every weight matmul together; each source attends over its own cache).

While anything decodes, the LM head is packed once for `max_rows` rows (glm/packed_gemm.py), and the
sources' generate calls use that pack instead of making their own.

So the search (processors, candidates, beam hypotheses, finished sources leaving) is generate's, not a
copy. A source decoding alone runs the same operations on the same shapes as predict with --batch_size 1,
so its answer is bit-identical; batched with others, its weight matmuls see more rows, which can move the
last float bits of its log-probabilities (the answer changes only if two candidates tie to that precision).
"""

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import paddle
from greenlet import greenlet
from paddlenlp.utils.log import logger

from ..generation import GenerationConfig, GLMGenerator, _DecodingRows, rows_per_source
from ..decoding_cache import DecodingCache, DecodingCacheGroup, DecodingMaskGroup
from ..packed_gemm import packed_transposed

__all__ = ["Engine", "Source", "SourceListener", "Cancelled", "QueueFull"]


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


@dataclass
class Source:
    """One prompt of a request: its token ids, its decoding settings and who listens."""

    ids: List[int]
    config: GenerationConfig
    listener: SourceListener
    deadline: float = float("inf")  # time.monotonic() after which it is cancelled ("timeout")
    cancel_reason: Optional[str] = None
    # engine state
    _greenlet: Optional[greenlet] = field(default=None, repr=False)
    _job: Optional[tuple] = field(default=None, repr=False)
    _result: object = field(default=None, repr=False)
    _done: bool = field(default=False, repr=False)

    @property
    def rows(self) -> int:
        return rows_per_source(self.config)

    def cancel(self, reason: str):
        """Ends the source at its next step (from any thread)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason


class _SourceGenerator(GLMGenerator):
    """The served GLMGenerator for one source: the same search, its model calls handed to the engine."""

    def __init__(self, base: GLMGenerator, source: Source, engine: "Engine"):
        self.__dict__.update(base.__dict__)  # the same model, special ids, banned ids
        self.source, self.engine = source, engine
        self._blank = 0  # the blank being decoded

    def _forward(self, cache, input_ids, position_ids, mask):
        # The engine returns the last position's log-probabilities (all a caller of _forward reads of the
        # hidden states, through _logprobs) and the cache.
        return self.engine._call(self.source, (cache, input_ids, position_ids, mask))

    def _logprobs(self, logprobs):
        return logprobs

    def _start_rows(self, cache, memory_valid, mask_positions, copies, capacity):
        return _ObservedRows(self, cache, memory_valid, mask_positions, copies, capacity)

    def _decode_blank(self, cache, memory_valid, mask_positions, config, rng):
        answers = super()._decode_blank(cache, memory_valid, mask_positions, config, rng)
        self.source.listener.blank_done(self._blank, answers[0])
        self._blank += 1
        return answers


class _ObservedRows(_DecodingRows):
    """The decoding rows of one source; tells the listener each step's tokens."""

    def step(self, tokens):
        self.generator.source.listener.tokens(tokens)
        return super().step(tokens)


class Engine:
    """Owns the model through `generator` (the Predictor's GLMGenerator) and decodes every admitted source.

    max_rows: decoding rows (beams, or answer copies, summed over sources) in the batch; a request that would
    exceed them waits, unless nothing decodes (then it runs alone). max_queue: requests waiting; one more is
    refused with QueueFull. `on_step(rows)` is called after each batched step (metrics)."""

    def __init__(self, generator: GLMGenerator, max_rows: int = 64, max_queue: int = 64,
                 on_step: Optional[Callable[[int], None]] = None):
        self.generator = generator
        self.max_rows, self.max_queue = max_rows, max_queue
        self.on_step = on_step
        self._lock = threading.Condition()
        self._queue = collections.deque()  # requests (lists of sources) not yet decoding
        self._live: List[Source] = []
        self._exclusive = collections.deque()  # (function, callback): other uses of the model, between steps
        self._stopping = False
        self._thread = None
        self._packing = False  # whether the model's packed LM head is the engine's (set while sources decode)

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

    def stop(self, timeout: float = 10.0):
        """Cancels what still decodes or waits ("shutdown") and ends the loop."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
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
            self._pack_lm_head()
        for source in list(self._live):
            if now > source.deadline:
                source.cancel("timeout")
            self._resume(source)
            if source._done:
                self._live.remove(source)
        if self._live:
            self._run_jobs(self._live)
        else:
            self._drop_lm_head_pack()
        return not (self._stopping and not self._live)

    def _pack_lm_head(self):
        """Packs the LM head for up to max_rows rows before sources start (their generate keeps the pack).
        Dropped when nothing decodes: the pack is a copy of the weights, stale if they ever changed."""
        model = self.generator.model
        if not self._packing and model.packed_lm_head is None:
            model.packed_lm_head = packed_transposed(model.glm.word_embeddings.weight, self.max_rows)
            self._packing = model.packed_lm_head is not None

    def _drop_lm_head_pack(self):
        if self._packing:
            self.generator.model.packed_lm_head, self._packing = None, False

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
            source._greenlet.switch()

    def _decode(self, source: Source):
        try:
            if source.cancel_reason is not None:
                raise Cancelled(source.cancel_reason)
            blanks = _SourceGenerator(self.generator, source, self).generate([source.ids], source.config)[0]
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
        source._job = job
        source._greenlet.parent.switch()
        result, source._result, source._job = source._result, None, None
        if isinstance(result, BaseException):
            raise result
        return result

    def _run_jobs(self, sources: List[Source]):
        steps = [s for s in sources if isinstance(s._job[0], list) and isinstance(s._job[0][0], DecodingCache)]
        for source in sources:
            if source in steps:
                continue
            try:
                source._result = self._model_call(*source._job)
            except Exception as error:  # noqa: BLE001  (raised in that source's generate)
                source._result = error
        if not steps:
            return
        try:
            results = self._step(steps)
        except Exception as error:  # noqa: BLE001
            results = [error] * len(steps)
        for source, result in zip(steps, results):
            source._result = result
        if self.on_step is not None:
            self.on_step(sum(len(s._job[1]) for s in steps))

    def _model_call(self, cache, input_ids, position_ids, mask):
        # no_grad here, not only around the loop: the sources' generate calls enter and leave paddle.no_grad
        # interleaved on this one thread, so the mode they restore is not necessarily the loop's.
        with paddle.no_grad():
            hidden, cache = GLMGenerator._forward(self.generator, cache, input_ids, position_ids, mask)
            return GLMGenerator._logprobs(self.generator, hidden), cache

    def _step(self, steps: List[Source]) -> List[tuple]:
        """One decoding step of several sources as one forward; per source (log-probabilities, cache)."""
        if len(steps) == 1:  # alone: exactly predict's call
            return [self._model_call(*steps[0]._job)]
        jobs = [source._job for source in steps]
        layers = len(jobs[0][0])
        cache = [DecodingCacheGroup([job[0][layer] for job in jobs]) for layer in range(layers)]
        mask = DecodingMaskGroup([job[3] for job in jobs])
        logprobs, _ = self._model_call(
            cache, np.concatenate([job[1] for job in jobs]), np.concatenate([job[2] for job in jobs]), mask
        )
        bounds = np.cumsum([0] + [len(job[1]) for job in jobs])
        return [(logprobs[start:end], job[0]) for job, start, end in zip(jobs, bounds[:-1], bounds[1:])]

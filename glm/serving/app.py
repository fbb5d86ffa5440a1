"""The FastAPI app: OpenAI's /v1/completions and /v1/models, GLM's /fill and /score, /health, /ready,
/metrics and the page at /. Decoding runs in the engine's thread; handlers only await its events."""

import asyncio
import importlib.resources
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inputs import MultipleChoiceBuilder
from ..configuration import GLMConfig
from ..modeling import GLMForMultipleChoice
from ..prediction import BLANK, GenerationArguments, Predictor
from ..understanding.multiple_choice import score_examples
from .engine import Engine, QueueFull
from .metrics import CONTENT_TYPE, ServerMetrics
from .middleware import BodyLimit, Observed, RequireApiKey, error_body
from .runs import Ended, Generation
from .schema import MAX_PROMPTS, CompletionRequest, FillRequest, RequestError, ScoreRequest, decoding_config
from .text import ChoiceText

__all__ = ["ServeOptions", "create_app"]


@dataclass
class ServeOptions:
    model_name: str  # what /v1/models lists and a request's `model` must name
    api_key: Optional[str] = None
    max_body_bytes: int = 1 << 20
    max_queue: int = 64  # requests waiting to join the batch; one more gets 503
    max_rows: int = 64  # rows decoding together (beams or answer copies summed over prompts)
    request_timeout: float = 300.0  # seconds from arrival to the last token
    retry_after: int = 1  # the Retry-After of a 503


class _Overloaded(Exception):
    """The engine's queue is full: 503 with Retry-After."""


def _error(status: int, message: str, param=None, kind="invalid_request_error", headers=None) -> Response:
    return Response(error_body(message, kind, param), status, headers=headers, media_type="application/json")


def _ended_error(reason: str, options: ServeOptions) -> Response:
    if reason == "timeout":
        return _error(504, f"the request took longer than the server's limit of {options.request_timeout:g} s", kind="timeout")
    if reason == "shutdown":
        return _error(503, "the server is shutting down", kind="overloaded", headers={"Retry-After": str(options.retry_after)})
    if reason == "disconnected":
        return _error(499, "the client disconnected")
    return _error(500, f"decoding failed: {reason}", kind="server_error")


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _cancel_on_disconnect(request: Request, generation: Generation):
    """A non-streamed request whose client leaves: its rows leave the batch at the next step."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancel("disconnected")
            return


class _Choices:
    """The choices of a completion (per prompt, `n` of them: index = prompt * n + copy) built from the
    generation's events: ChoiceText per choice; a prompt whose choices all met a stop string is cancelled."""

    def __init__(self, prompts: List[str], generation: Generation, stops: List[str]):
        self.generation, self.n = generation, generation.config.num_return_sequences
        self.texts = []
        for prompt in prompts:
            blanks = len(BLANK.findall(prompt))
            segments = BLANK.split(prompt) if blanks > 1 else None  # several blanks: the filled text, as predict
            self.texts += [ChoiceText(segments, stops) for _ in range(self.n)]
        self.begun = [False] * len(prompts)
        self.lengths = [False] * len(self.texts)  # a blank's answer reached tgt_length
        self.tokens = 0

    def pieces(self, event):
        """[(choice, text, finished)] that `event` adds."""
        kind, source = event[0], event[1]
        choices = range(source * self.n, (source + 1) * self.n)
        out = []
        if not self.begun[source]:
            self.begun[source] = True
            out += [(c, piece, False) for c in choices for piece in [self.texts[c].begin()] if piece]
        if kind == "piece":
            c = choices[event[2]]
            out.append((c, self.texts[c].answer(event[3]), False))
        elif kind == "blank":
            for c, rest, count in zip(choices, event[3], event[4]):
                out.append((c, self.texts[c].end_blank(event[2], rest), False))
                self.tokens += count
                self.lengths[c] = count >= self.generation.config.tgt_length
        else:
            out += [(c, self.texts[c].finish(), True) for c in choices]
        if kind != "done" and all(self.texts[c].stopped for c in choices):
            self.generation.cancel("stop", source)
        return out

    def finish_reason(self, choice: int) -> str:
        return "length" if self.lengths[choice] and not self.texts[choice].stopped else "stop"


def create_app(predictor: Predictor, generation_args: GenerationArguments, options: ServeOptions) -> FastAPI:
    generator, builder, tokenizer = predictor.generator, predictor.builder, predictor.tokenizer
    engine = Engine(generator, options.max_rows, options.max_queue)
    metrics = ServerMetrics(engine)
    engine.on_step = metrics.step_rows.observe
    state = {"accepting": False, "choice_head": None}

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        state["accepting"] = True
        metrics.ready.set(1)
        yield
        state["accepting"] = False
        metrics.ready.set(0)
        engine.stop()

    # No docs pages: they load their scripts from a CDN.
    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    app.state.stop_accepting = lambda: state.update(accepting=False) or metrics.ready.set(0)
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    if options.api_key:
        app.add_middleware(RequireApiKey, api_key=options.api_key)
    app.add_middleware(Observed, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        first = error.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"body: not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", "body")
        field = ".".join(where) or "body"
        return _error(400, f"{field}: {first.get('msg', 'invalid')}", where[0] if where else "body")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):  # 404, 405
        return _error(error.status_code, f"{request.method} {request.url.path}: {error.detail}")

    @app.exception_handler(RequestError)
    async def bad_request(request, error: RequestError):
        return _error(error.status, str(error), error.param)

    def check_accepting():
        if not state["accepting"]:
            raise RequestError(None, "the server is shutting down", 503)

    def built_sources(texts: List[str], field: str):
        """Token ids of each text, as predict builds them; a text the model cannot take whole is refused."""
        sources = []
        for text in texts:
            ids, truncated = builder.source_ids(text)
            if truncated:
                tokens = len(builder.tokenize(text))
                raise RequestError(field, f"{tokens} tokens after tokenization, over the server's src_length "
                                          f"{builder.src_length} (with [CLS], the blank and <|endoftext|>)")  # fmt: skip
            sources.append(ids)
        return sources

    async def start(texts: List[str], field: str, body) -> Generation:
        check_accepting()
        config = decoding_config(body, generation_args, predictor.config.tgt_length, generator.max_positions)
        sources = await run_in_threadpool(built_sources, texts, field)
        generation = Generation(engine, sources, config, lambda tokens: tokenizer.decode(tokens), builder.ids.pad,
                                options.request_timeout)  # fmt: skip
        try:
            generation.submit()
        except QueueFull as full:
            raise _Overloaded(str(full)) from None
        return generation

    @app.exception_handler(_Overloaded)
    async def overloaded(request, error):
        return _error(503, f"server busy: {error}; retry later", kind="overloaded",
                      headers={"Retry-After": str(options.retry_after)})  # fmt: skip

    def record_generation(generation: Generation, tokens: int):
        metrics.tokens.inc(tokens)
        metrics.ttft.observe((generation.first_piece or time.monotonic()) - generation.started)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not state["accepting"]:
            return _error(503, "not ready: the server is shutting down", kind="overloaded")
        if engine.queue_depth >= options.max_queue:
            return _error(503, "not ready: the queue is full", kind="overloaded", headers={"Retry-After": str(options.retry_after)})
        return {"ready": True, "queue_depth": engine.queue_depth, "live_rows": engine.live_rows}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return importlib.resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": 0, "owned_by": "glm-paddle"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.model is not None and body.model != options.model_name:
            raise RequestError("model", f"{body.model!r} is not served here (GET /v1/models: {options.model_name!r})", 404)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise RequestError("prompt", f"give 1 to {MAX_PROMPTS} prompts; got {len(prompts)}")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise RequestError("stop", f"at most 4 stop strings; got {len(stops)}")
        generation = await start(prompts, "prompt", body)
        choices = _Choices(prompts, generation, stops)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": options.model_name}  # fmt: skip
        usage_prompt = sum(len(source.ids) for source in generation.sources)
        if body.stream:
            return StreamingResponse(stream_completion(generation, choices, head, request), media_type="text/event-stream")
        texts = [""] * len(choices.texts)
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, generation))
        try:
            async for event in generation.events():
                for choice, piece, _ in choices.pieces(event):
                    texts[choice] += piece
        except Ended as ended:
            return _ended_error(ended.reason, options)
        finally:
            watcher.cancel()
        record_generation(generation, choices.tokens)
        return dict(head, choices=[{"index": c, "text": text, "logprobs": None, "finish_reason": choices.finish_reason(c)}
                                   for c, text in enumerate(texts)],
                    usage={"prompt_tokens": usage_prompt, "completion_tokens": choices.tokens,
                           "total_tokens": usage_prompt + choices.tokens})  # fmt: skip

    async def stream_completion(generation: Generation, choices: _Choices, head: dict, request: Request):
        """One chunk per token for greedy and sampling; beam search's answers in one chunk each, once decided."""
        beams = generation.config.decode_strategy == "beam_search"
        held = [""] * len(choices.texts)
        try:
            async for event in generation.events():
                for choice, piece, finished in choices.pieces(event):
                    if beams and not finished:
                        held[choice] += piece
                        continue
                    text, held[choice] = held[choice] + piece, ""
                    reason = choices.finish_reason(choice) if finished else None
                    yield _sse(dict(head, choices=[{"index": choice, "text": text, "logprobs": None, "finish_reason": reason}]))
            record_generation(generation, choices.tokens)
        except Ended as ended:
            request.scope["state"]["outcome"] = "timeout" if ended.reason == "timeout" else "error"
            yield _sse(json.loads(_ended_error(ended.reason, options).body))
        finally:
            generation.cancel("disconnected")  # a no-op once done; a client gone mid-stream frees its rows
        yield "data: [DONE]\n\n"

    @app.post("/fill")
    async def fill(body: FillRequest, request: Request):
        """Every blank of `text` answered left to right: predict's `prediction` (and `predictions` with
        several answers), the filled text and each blank's answers. Streamed: `{"blank", "text"}` pieces of
        the first answer, then the whole result."""
        generation = await start([body.text], "text", body)
        if body.stream:
            return StreamingResponse(stream_fill(generation, body.text, request), media_type="text/event-stream")
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, generation))
        try:
            result = None
            async for kind, result in fill_events(generation, body.text):
                pass
        except Ended as ended:
            return _ended_error(ended.reason, options)
        finally:
            watcher.cancel()
        return result

    async def fill_events(generation: Generation, text: str):
        """("piece", {"blank", "text"}) of the first answer as it streams, then ("result", fields)."""
        copies = generation.config.num_return_sequences
        blanks, current, tokens = [], [""] * copies, 0
        async for event in generation.events():
            if event[0] == "piece":
                current[event[2]] += event[3]
                if event[2] == 0 and event[3]:
                    yield "piece", {"blank": len(blanks), "text": event[3]}
            elif event[0] == "blank":
                if event[3][0]:
                    yield "piece", {"blank": len(blanks), "text": event[3][0]}
                blanks.append([answer + rest for answer, rest in zip(current, event[3])])
                current, tokens = [""] * copies, tokens + sum(event[4])
        record_generation(generation, tokens)
        fields = predictor.output_fields(text, blanks)
        best = [answers[0] for answers in blanks]
        answers = iter(best)
        filled = BLANK.sub(lambda match: next(answers, match.group(0)), text) if BLANK.search(text) else text + best[0]
        yield "result", dict(fields, answers=best, filled=filled)

    async def stream_fill(generation: Generation, text: str, request: Request):
        try:
            async for kind, payload in fill_events(generation, text):
                yield _sse(payload if kind == "piece" else dict(payload, done=True))
        except Ended as ended:
            request.scope["state"]["outcome"] = "timeout" if ended.reason == "timeout" else "error"
            yield _sse(json.loads(_ended_error(ended.reason, options).body))
        finally:
            generation.cancel("disconnected")
        yield "data: [DONE]\n\n"

    @app.post("/score")
    async def score(body: ScoreRequest):
        """The choices' scores (summed log-probabilities at the blank) and the best one, as `evaluate.py --task
        multiple_choice` scores them: GLMForMultipleChoice on the served weights."""
        check_accepting()
        choice_builder = MultipleChoiceBuilder(tokenizer, generator.max_positions)
        try:
            example = await run_in_threadpool(choice_builder.build, body.context, body.choices)
        except ValueError as error:
            raise RequestError("choices", str(error)) from None
        if example.context_truncated:
            raise RequestError("context", f"over the model's {generator.max_positions} tokens after tokenization")
        if len(example.input_ids) > generator.max_positions:
            raise RequestError("choices", f"context and choices take {len(example.input_ids)} tokens, over the "
                                          f"model's max_sequence_length {generator.max_positions}")  # fmt: skip
        done = asyncio.get_running_loop().create_future()

        def scored(result, error):
            done.get_loop().call_soon_threadsafe(lambda: done.done() or (
                done.set_exception(error) if error else done.set_result(result)))

        engine.run_exclusive(lambda: score_examples(choice_head(), [example], 1, builder.ids.pad)[0], scored)
        scores = await done
        best = max(range(len(scores)), key=scores.__getitem__)
        return {"scores": scores, "best": best, "choice": body.choices[best]}

    def choice_head():
        """GLMForMultipleChoice on the served backbone (and its adapter), made once on the engine's thread.
        It is built on a one-layer stand-in config, so the only weights it holds are the served ones."""
        if state["choice_head"] is None:
            head = GLMForMultipleChoice(GLMConfig(num_layers=1, hidden_size=8, num_attention_heads=1, vocab_size=8,
                                                  max_sequence_length=8))  # fmt: skip
            head.glm, head.config = generator.model.glm, generator.model.config
            head.eval()  # score_examples restores the mode it found: training would switch dropout on in the backbone
            state["choice_head"] = head
        return state["choice_head"]

    return app

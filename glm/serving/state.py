"""What every endpoint of one server shares: the served Predictor, the server's decoding defaults, its
options, the engine that owns the model, the metrics, and whether requests are accepted. One instance
per app, at `app.state.serving`; an endpoint gets it with `Depends(serving)`."""

import asyncio
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..configuration import GLMConfig
from ..errors import RequestError
from ..generation_settings import GenerationArguments
from ..inputs import MultipleChoiceBuilder
from ..modeling import GLMForMultipleChoice
from ..ptuning import PromptConfig, builder_prompt, load_prompt
from ..prediction import Predictor
from .engine import ENGINE_PREFIX, Engine, QueueFull
from .metrics import ServerMetrics
from ..generation import rows_per_source
from .protocol import check_texts, decoding_config
from .runs import Generation, Outbox

__all__ = ["ServeOptions", "ServedPrompt", "ServingState", "Overloaded", "serving", "cancel_on_disconnect"]


@dataclass
class ServeOptions:
    model_name: str  # what /v1/models lists and a request's `model` must name
    api_key: Optional[str] = None
    max_body_bytes: int = 1 << 20
    max_queue: int = 64  # requests waiting to join the batch; one more gets 503
    max_rows: int = 64  # rows decoding together (beams or answer copies summed over prompts)
    max_request_rows: int = 32  # rows of one request (prompts x beams or answers): more is refused; half the batch, so
    # one request never fills it and holds every other back until it ends
    request_timeout: float = 300.0  # seconds from arrival to the last token
    retry_after: int = 1  # the Retry-After of a 503
    allowed_hosts: Optional[List[str]] = None  # Host names accepted (None: any; see middleware.AllowedHosts)


@dataclass
class ServedPrompt:
    """A THUDM P-tuning prompt (glm/ptuning.py) for /score: its directory, its config, the base it was checked against."""

    path: str
    config: PromptConfig
    base_path: Optional[str]
    force: bool = False


class Overloaded(Exception):
    """The engine's queue is full: 503 with Retry-After."""


class ServingState:
    def __init__(self, predictor: Predictor, generation_args: GenerationArguments, options: ServeOptions,
                 prefixes: Optional[Dict[str, object]] = None, prompt: Optional[ServedPrompt] = None):
        """`prefixes`: more models served over the same base, {name: GLMPrefixModel} (server.py --prefixes),
        chosen by a request's `model`; their requests decode in the same steps as the base's. `prompt`: THUDM's
        P-tuning prompt /score applies for the server's own model (checked by server.py)."""
        self.predictor, self.generation_args, self.options = predictor, generation_args, options
        self.prefixes, self.prompt = dict(prefixes or {}), prompt
        self.generator, self.builder, self.tokenizer = predictor.generator, predictor.builder, predictor.tokenizer
        self.engine = Engine(self.generator, options.max_rows, options.max_queue)
        self.metrics = ServerMetrics(self.engine)
        self.engine.on_step = self.metrics.step_rows.observe
        self.accepting = False
        self._choice_heads = {}  # per served model name
        self.outbox: Optional[Outbox] = None  # made on the event loop, at start


    def start(self):
        """On the event loop (the app's lifespan)."""
        self.outbox = Outbox(asyncio.get_running_loop())
        self.engine.events_ready = self.outbox.flush
        self.engine.start()
        self.accepting = True
        self.metrics.ready.set(1)

    def stop_accepting(self):
        """From now on /ready says 503 and new requests are refused (a drain before shutdown)."""
        self.accepting = False
        self.metrics.ready.set(0)

    def stop(self):
        self.stop_accepting()
        self.engine.stop()

    def check_accepting(self):
        if not self.accepting:
            raise RequestError(None, "the server is shutting down", 503)

    def built_sources(self, texts: List[str], field: str):
        """Token ids of each text, as predict builds them; a text the model cannot take whole is refused."""
        sources = []
        for text in texts:
            ids, truncated = self.builder.source_ids(text)
            if truncated:
                tokens = self.builder.tokenize(text)
                blank = 0 if any(token in self.builder.ids.mask_ids for token in tokens) else 1  # appended if none
                raise RequestError(field, f"{len(tokens) + 2 + blank} tokens after tokenization with [CLS], the blank "
                                          f"and <|endoftext|>, over the server's src_length {self.builder.src_length}")  # fmt: skip
            sources.append(ids)
        return sources

    def choice_builder(self, model: str) -> MultipleChoiceBuilder:
        """/score's rows for served model `model`: with the prompt's tokens in the pattern where one applies."""
        prompt = self.prompt.config if self.prompt is not None and model == self.options.model_name else None
        return MultipleChoiceBuilder(self.tokenizer, self.generator.max_positions, **builder_prompt(prompt))

    def model_names(self) -> List[str]:
        return [self.options.model_name, *self.prefixes]

    def check_model(self, name: Optional[str]) -> str:
        """The served model a request's `model` names (None: the server's own); 404 for any other."""
        if name is None or name == self.options.model_name:
            return self.options.model_name
        if name in self.prefixes:
            return name
        served = ", ".join(repr(n) for n in self.model_names())
        raise RequestError("model", f"{name!r} is not served here (GET /v1/models: {served})", 404)

    def prefix_of(self, name: str):
        """The engine Source's `prefix` for served model `name`."""
        return self.prefixes[name] if name in self.prefixes else ENGINE_PREFIX

    async def start_generation(self, texts: List[str], field: str, body, model: Optional[str] = None) -> Generation:
        """The request's sources submitted to the engine, decoded with the request's settings over the
        server's, by served model `model` (default the server's own)."""
        self.check_accepting()
        check_texts(field, texts)
        config = decoding_config(body, self.generation_args, self.predictor.config.tgt_length, self.generator.max_positions,
                                 self.generator.model.config.vocab_size)
        self.check_rows(len(texts), config, body)
        sources = await run_in_threadpool(self.built_sources, texts, field)
        generation = Generation(self.engine, sources, config, lambda tokens: self.tokenizer.decode(tokens),
                                self.builder.ids.pad, self.options.request_timeout, self.outbox,
                                self.prefix_of(model or self.options.model_name))  # fmt: skip
        try:
            generation.submit()
        except QueueFull as full:
            raise Overloaded(str(full)) from None
        return generation

    def check_rows(self, prompts: int, config, body):
        """A request decodes prompts x rows_per_source rows at once: beyond --max_request_rows it is refused,
        naming what made it wide (a request wider than the batch used to run alone, taking any memory)."""
        rows = prompts * rows_per_source(config)
        limit = self.options.max_request_rows
        if rows <= limit:
            return
        wide = [name for name in ("num_beams", "n", "num_return_sequences") if name in body.model_fields_set]
        field = wide[0] if wide else ("prompt" if prompts > 1 else "num_beams")
        raise RequestError(field, f"{prompts} prompt{'s' if prompts > 1 else ''} x {rows // prompts} rows each "
                                  f"({'beams' if config.decode_strategy == 'beam_search' else 'answers'}) is {rows} "
                                  f"rows, over the server's {limit} per request (--max_request_rows)")

    def record_generation(self, generation: Generation, tokens: int):
        self.metrics.tokens.inc(tokens)
        self.metrics.ttft.observe((generation.first_piece or time.monotonic()) - generation.started)

    def choice_head(self, model: Optional[str] = None):
        """GLMForMultipleChoice on the served backbone (and its adapter or prefix; that of served model `model`),
        made once per model on the engine's thread. It is built on a one-layer stand-in config, so the only
        weights it holds are the served ones."""
        model = model or self.options.model_name
        if model not in self._choice_heads:
            head = GLMForMultipleChoice(GLMConfig(num_layers=1, hidden_size=8, num_attention_heads=1, vocab_size=8,
                                                  max_sequence_length=8))  # fmt: skip
            head.glm, head.config = self.generator.model.glm, self.generator.model.config
            head.eval()  # score_examples restores the mode it found: training would switch dropout on in the backbone
            prefix = self.prefixes.get(model, self.generator.runner.prefix)
            if prefix is not None:
                head = prefix.over(head)
            elif self.prompt is not None and model == self.options.model_name:
                head = load_prompt(head, self.prompt.path, self.prompt.base_path, self.prompt.force)
            self._choice_heads[model] = head
        return self._choice_heads[model]


def serving(request: Request) -> ServingState:
    return request.app.state.serving


async def cancel_on_disconnect(request: Request, generation: Generation):
    """A non-streamed request whose client leaves: its rows leave the batch at the next step."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancel("disconnected")
            return


def watch_disconnect(request: Request, generation: Generation) -> "asyncio.Future":
    return asyncio.ensure_future(cancel_on_disconnect(request, generation))

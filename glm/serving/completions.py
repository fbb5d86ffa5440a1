"""OpenAI's completions: POST /v1/completions (streamed or not) and GET /v1/models."""

import json
import time
import uuid
from typing import List

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ..errors import RequestError
from ..prediction import BLANK
from .protocol import MAX_PROMPTS, MAX_STOP_CHARACTERS, CompletionRequest, check_texts, ended_response, sse
from .runs import Ended, Generation
from .state import ServingState, serving, watch_disconnect
from .text import ChoiceText

__all__ = ["router"]

router = APIRouter()


class Choices:
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


@router.api_route("/v1/models", methods=["GET", "HEAD"])
async def models(state: ServingState = Depends(serving)):
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "glm-paddle"}
                                       for name in state.model_names()]}  # fmt: skip


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: ServingState = Depends(serving)):
    options = state.options
    model = state.check_model(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise RequestError("prompt", f"give 1 to {MAX_PROMPTS} prompts; got {len(prompts)}")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise RequestError("stop", f"at most 4 stop strings; got {len(stops)}")
    if sum(map(len, stops)) > MAX_STOP_CHARACTERS:
        raise RequestError("stop", f"at most {MAX_STOP_CHARACTERS} characters in all; got {sum(map(len, stops))}")
    check_texts("stop", stops)
    generation = await state.start_generation(prompts, "prompt", body, model)
    choices = Choices(prompts, generation, stops)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model}  # fmt: skip
    usage_prompt = sum(len(source.ids) for source in generation.sources)
    if body.stream:
        return StreamingResponse(stream_completion(state, generation, choices, head, request),
                                 media_type="text/event-stream")
    texts = [""] * len(choices.texts)
    watcher = watch_disconnect(request, generation)
    try:
        async for event in generation.events():
            for choice, piece, _ in choices.pieces(event):
                texts[choice] += piece
    except Ended as ended:
        return ended_response(ended.reason, options.request_timeout, options.retry_after)
    finally:
        watcher.cancel()
    state.record_generation(generation, choices.tokens)
    return dict(head, choices=[{"index": c, "text": text, "logprobs": None, "finish_reason": choices.finish_reason(c)}
                               for c, text in enumerate(texts)],
                usage={"prompt_tokens": usage_prompt, "completion_tokens": choices.tokens,
                       "total_tokens": usage_prompt + choices.tokens})  # fmt: skip


async def stream_completion(state: ServingState, generation: Generation, choices: Choices, head: dict,
                            request: Request):
    """One chunk per token for greedy and sampling; beam search's answers in one chunk each, once decided."""
    beams = generation.config.decode_strategy == "beam_search"
    held = [""] * len(choices.texts)
    ended = False
    try:
        async for event in generation.events():
            for choice, piece, finished in choices.pieces(event):
                if beams and not finished:
                    held[choice] += piece
                    continue
                text, held[choice] = held[choice] + piece, ""
                reason = choices.finish_reason(choice) if finished else None
                yield sse(dict(head, choices=[{"index": choice, "text": text, "logprobs": None, "finish_reason": reason}]))
        state.record_generation(generation, choices.tokens)
    except Ended as stopped:
        request.scope["state"]["outcome"] = "timeout" if stopped.reason == "timeout" else "error"
        options = state.options
        yield sse(json.loads(ended_response(stopped.reason, options.request_timeout, options.retry_after).body))
    else:
        ended = True
    finally:
        generation.cancel("disconnected")  # a no-op once done; a client gone mid-stream frees its rows
        if not ended:
            request.scope["state"].setdefault("outcome", "disconnected")
    yield "data: [DONE]\n\n"

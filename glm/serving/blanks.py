"""GLM's own endpoints: POST /fill (every blank of a text answered, as predict_generation.py answers it) and
POST /score (the choices of a blank scored, as `evaluate.py --task multiple_choice` scores them)."""

import asyncio
import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import RequestError
from ..prediction import BLANK
from ..understanding.multiple_choice import score_examples
from .engine import QueueFull
from .protocol import MAX_CHOICES, FillRequest, ScoreRequest, check_texts, ended_response, sse
from .runs import Ended, Generation
from .state import Overloaded, ServingState, serving, watch_disconnect

__all__ = ["router"]

router = APIRouter()


@router.post("/fill")
async def fill(body: FillRequest, request: Request, state: ServingState = Depends(serving)):
    """Every blank of `text` answered left to right: predict's `prediction` (and `predictions` with
    several answers), the filled text and each blank's answers. Streamed: `{"blank", "text"}` pieces of
    the first answer, then the whole result."""
    generation = await state.start_generation([body.text], "text", body, state.check_model(body.model))
    if body.stream:
        return StreamingResponse(stream_fill(state, generation, body.text, request), media_type="text/event-stream")
    watcher = watch_disconnect(request, generation)
    try:
        result = None
        async for kind, result in fill_events(state, generation, body.text):
            pass
    except Ended as ended:
        return ended_response(ended.reason, state.options.request_timeout, state.options.retry_after)
    finally:
        watcher.cancel()
    return result


async def fill_events(state: ServingState, generation: Generation, text: str):
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
    state.record_generation(generation, tokens)
    fields = state.predictor.output_fields(text, blanks, generation.config.num_return_sequences)
    best = [answers[0] for answers in blanks]
    answers = iter(best)
    filled = BLANK.sub(lambda match: next(answers, match.group(0)), text) if BLANK.search(text) else text + best[0]
    yield "result", dict(fields, answers=best, filled=filled)


async def stream_fill(state: ServingState, generation: Generation, text: str, request: Request):
    ended = False
    try:
        async for kind, payload in fill_events(state, generation, text):
            yield sse(payload if kind == "piece" else dict(payload, done=True))
    except Ended as stopped:
        request.scope["state"]["outcome"] = "timeout" if stopped.reason == "timeout" else "error"
        yield sse(json.loads(ended_response(stopped.reason, state.options.request_timeout, state.options.retry_after).body))
    else:
        ended = True
    finally:
        generation.cancel("disconnected")
        if not ended:  # the client left mid-stream: counted as such, not as ok
            request.scope["state"].setdefault("outcome", "disconnected")
    yield "data: [DONE]\n\n"


@router.post("/score")
async def score(body: ScoreRequest, state: ServingState = Depends(serving)):
    """The choices' scores (summed log-probabilities at the blank) and the best one, as `evaluate.py --task
    multiple_choice` scores them: GLMForMultipleChoice on the served weights."""
    state.check_accepting()
    model = state.check_model(body.model)
    check_texts("context", [body.context])
    check_texts("choices", body.choices)
    if len(body.choices) > MAX_CHOICES:
        raise RequestError("choices", f"at most {MAX_CHOICES}; got {len(body.choices)}")
    blanks = BLANK.findall(body.context)
    if len(blanks) > 1:  # as evaluate.py --task multiple_choice refuses it; none: [MASK] is appended, as there
        raise RequestError("context", f"holds {len(blanks)} blanks ({', '.join(blanks)}); a choice fills one")
    max_positions = state.generator.max_positions
    choice_builder = state.choice_builder(model)
    try:
        example = await run_in_threadpool(choice_builder.build, body.context, body.choices)
    except ValueError as error:
        raise RequestError("choices", str(error)) from None
    if example.context_truncated:
        raise RequestError("context", f"over the model's {max_positions} tokens after tokenization")
    if len(example.input_ids) > max_positions:
        raise RequestError("choices", f"context and choices take {len(example.input_ids)} tokens, over the "
                                      f"model's max_sequence_length {max_positions}")  # fmt: skip
    done = asyncio.get_running_loop().create_future()

    def scored(result, error):
        done.get_loop().call_soon_threadsafe(lambda: done.done() or (
            done.set_exception(error) if error else done.set_result(result)))

    pad = state.builder.ids.pad
    try:  # in the engine's bounded queue, as a completion waits
        state.engine.run_exclusive(lambda: score_examples(state.choice_head(model), [example], 1, pad)[0], scored)
    except QueueFull as full:
        raise Overloaded(str(full)) from None
    scores = await done
    best = max(range(len(scores)), key=scores.__getitem__)
    return {"scores": scores, "best": best, "choice": body.choices[best]}

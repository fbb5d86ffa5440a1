"""The HTTP protocol of the server: request bodies, how they become decoding settings, and the shapes of
answers that every endpoint shares (OpenAI's error object, Server-Sent Events).

GLM's own settings are accepted under predict_generation.py's flag names: the fields of
glm.generation_settings.GenerationArguments, read from it, so a flag predict gains is accepted here too. What a
request does not set comes from the server's settings, resolved as predict resolves its flags (flags
given, then the checkpoint's generation_settings.json, then the built-ins). OpenAI's names map onto
them: max_tokens -> tgt_length, n -> num_return_sequences, temperature 0 -> greedy search, and a
temperature, top_p or top_k without a decode_strategy -> sampling.
"""

import dataclasses
import json
from typing import List, Optional, Union

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from ..bounds import TGT_LENGTH, Bound

TOP_K = Bound(0)  # up to the vocabulary
from ..errors import InvalidSettings, RequestError
from ..generation import GenerationConfig
from ..generation_settings import GenerationArguments

__all__ = [
    "RequestError", "CompletionRequest", "FillRequest", "ScoreRequest", "decoding_config", "MAX_PROMPTS",
    "MAX_STOP_CHARACTERS", "MAX_CHOICES", "check_texts", "error_body", "error_response", "ended_response", "sse",
]  # fmt: skip

MAX_PROMPTS = 32  # prompts in one completion request
MAX_STOP_CHARACTERS = 512  # all stop strings together: matching them costs a pass over the text per piece
MAX_CHOICES = 64  # choices of one /score request (their tokens are bounded by the model's positions)

_STRICT = ConfigDict(extra="forbid", strict=True)  # "5" is not 5: a wrong type is a 400, not a guess

# Every decoding flag of predict_generation.py, optional; plus the length and seed, as predict names them.
DecodingFields = create_model(
    "DecodingFields",
    __config__=_STRICT,
    tgt_length=(Optional[int], None),
    seed=(Optional[int], None),
    max_tokens=(Optional[int], None),
    n=(Optional[int], None),
    **{f.name: (Optional[f.type], None) for f in dataclasses.fields(GenerationArguments)},
)


class CompletionRequest(DecodingFields):
    model: Optional[str] = None
    prompt: Union[str, List[str]]
    stream: bool = False
    stop: Optional[Union[str, List[str]]] = None
    user: Optional[str] = None  # OpenAI clients may send it; not used


class FillRequest(DecodingFields):
    model: Optional[str] = None
    text: str
    stream: bool = False


class ScoreRequest(BaseModel):
    model_config = _STRICT
    model: Optional[str] = None
    context: str
    choices: List[str] = Field(min_length=2)


def check_texts(field: str, texts: List[str]):
    """Every text of `field` is text: JSON can carry a lone surrogate (\\ud800), which no tokenizer encodes."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise RequestError(field, f"holds a lone surrogate (\\u{ord(text[error.start]):04x}), which is not text") from None


def decoding_config(request: BaseModel, defaults: GenerationArguments, default_tgt_length: int,
                    max_positions: int, vocab_size: Optional[int] = None) -> GenerationConfig:
    """The request's GenerationConfig over the server's `defaults`; RequestError names a bad field (top_k
    above `vocab_size`, the model's vocabulary, too)."""
    given = {name: value for name, value in request.model_dump(exclude_unset=True).items() if value is not None}
    for openai_name, glm_name in (("max_tokens", "tgt_length"), ("n", "num_return_sequences")):
        if openai_name in given and glm_name in given:
            raise RequestError(openai_name, f"give {openai_name} or {glm_name}, not both")
        if openai_name in given:
            given[glm_name] = given.pop(openai_name)
    tgt_length = given.pop("tgt_length", default_tgt_length)
    length_name = "max_tokens" if "max_tokens" in request.model_fields_set else "tgt_length"
    problem = TGT_LENGTH.problem(tgt_length, model_max=max_positions)
    if problem:
        raise RequestError(length_name, problem)
    if given.get("temperature") == 0 and given.get("decode_strategy", "greedy_search") == "greedy_search":
        given.update(decode_strategy="greedy_search")  # OpenAI's greedy, also with GLM's name for it
        del given["temperature"]
    elif "decode_strategy" not in given and {"temperature", "top_p", "top_k"} & set(given):
        given["decode_strategy"] = "sampling"
    problem = TOP_K.problem(given.get("top_k", 0), high=vocab_size, high_is="the vocabulary")
    if problem:
        raise RequestError("top_k", problem)
    fields = {f.name for f in dataclasses.fields(GenerationArguments)}
    arguments = dataclasses.replace(defaults, **{name: value for name, value in given.items() if name in fields})
    if "min_tgt_length" not in given:  # the server's minimum never makes a short max_tokens an error
        arguments.min_tgt_length = min(arguments.min_tgt_length, tgt_length)
    try:
        return arguments.config(tgt_length, seed=given.get("seed"))
    except InvalidSettings as error:  # the config's own checks: the first, under the name the request used
        name, problem = error.problems[0]
        openai_name = {"tgt_length": "max_tokens", "num_return_sequences": "n"}.get(name)
        raise RequestError(openai_name if openai_name in request.model_fields_set else name, problem) from None


def error_body(message: str, kind: str = "invalid_request_error", param=None) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": None}}).encode()


def error_response(status: int, message: str, param=None, kind="invalid_request_error", headers=None) -> Response:
    return Response(error_body(message, kind, param), status, headers=headers, media_type="application/json")


def ended_response(reason: str, request_timeout: float, retry_after: int) -> Response:
    """The answer to a request whose decoding ended early (glm.serving.runs.Ended)."""
    if reason == "timeout":
        return error_response(504, f"the request took longer than the server's limit of {request_timeout:g} s",
                              kind="timeout")
    if reason == "shutdown":
        return error_response(503, "the server is shutting down", kind="overloaded",
                              headers={"Retry-After": str(retry_after)})
    if reason == "disconnected":
        return error_response(499, "the client disconnected")
    return error_response(500, f"decoding failed: {reason}", kind="server_error")


def sse(payload) -> str:
    """One Server-Sent Event holding `payload` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

"""Request bodies and how they become decoding settings.

GLM's own settings are accepted under predict_generation.py's flag names: the fields of
glm.prediction.GenerationArguments, read from it, so a flag predict gains is accepted here too. What a
request does not set comes from the server's settings, resolved as predict resolves its flags (flags
given, then the checkpoint's generation_settings.json, then the built-ins). OpenAI's names map onto
them: max_tokens -> tgt_length, n -> num_return_sequences, temperature 0 -> greedy search, and a
temperature, top_p or top_k without a decode_strategy -> sampling.
"""

import dataclasses
from typing import List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..generation import GenerationConfig
from ..prediction import GenerationArguments

__all__ = ["RequestError", "CompletionRequest", "FillRequest", "ScoreRequest", "decoding_config", "MAX_PROMPTS"]

MAX_PROMPTS = 32  # prompts in one completion request


class RequestError(ValueError):
    """A bad request, said in one line that names the field (`param`): answered with status 400."""

    def __init__(self, param: Optional[str], message: str, status: int = 400):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.status = param, status


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
    text: str
    stream: bool = False


class ScoreRequest(BaseModel):
    model_config = _STRICT
    context: str
    choices: List[str] = Field(min_length=2)


def decoding_config(request: BaseModel, defaults: GenerationArguments, default_tgt_length: int,
                    max_positions: int) -> GenerationConfig:
    """The request's GenerationConfig over the server's `defaults`; RequestError names a bad field."""
    given = {name: value for name, value in request.model_dump(exclude_unset=True).items() if value is not None}
    for openai_name, glm_name in (("max_tokens", "tgt_length"), ("n", "num_return_sequences")):
        if openai_name in given and glm_name in given:
            raise RequestError(openai_name, f"give {openai_name} or {glm_name}, not both")
        if openai_name in given:
            given[glm_name] = given.pop(openai_name)
    tgt_length = given.pop("tgt_length", default_tgt_length)
    length_name = "max_tokens" if "max_tokens" in request.model_fields_set else "tgt_length"
    if not 1 <= tgt_length <= max_positions:
        raise RequestError(length_name, f"must be between 1 and {max_positions} (the model's max_sequence_length); got {tgt_length}")
    if "decode_strategy" not in given:
        if given.get("temperature") == 0:
            given.update(decode_strategy="greedy_search")
            del given["temperature"]
        elif {"temperature", "top_p", "top_k"} & set(given):
            given["decode_strategy"] = "sampling"
    fields = {f.name for f in dataclasses.fields(GenerationArguments)}
    arguments = dataclasses.replace(defaults, **{name: value for name, value in given.items() if name in fields})
    if "min_tgt_length" not in given:  # the server's minimum never makes a short max_tokens an error
        arguments.min_tgt_length = min(arguments.min_tgt_length, tgt_length)
    if arguments.decode_strategy == "beam_search" and arguments.num_return_sequences > arguments.num_beams:
        name = "n" if "n" in request.model_fields_set else "num_return_sequences"
        raise RequestError(name, f"{arguments.num_return_sequences} answers need as many beams; num_beams is {arguments.num_beams}")
    try:
        return arguments.config(tgt_length, seed=given.get("seed"))
    except Exception as error:  # the config's own checks (UserError), each naming its field first
        message = str(error)
        raise RequestError(None, message) from None

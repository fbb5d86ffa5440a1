"""Answering GLM prompts with a checkpoint: the decoding flags, the settings a checkpoint was evaluated
with, and the Predictor (model, adapter, input builder, generator) that predict_generation.py and the
server share, so both answer a text exactly as finetuning's evaluation decodes it.
"""

import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

import paddle

from .errors import UserError
from .generation import GenerationConfig, GLMGenerator, default_banned_ids, generate_answers
from .inputs import MASK_TOKENS, GLMInputBuilder
from .loading import load_model_and_tokenizer
from .lora import load_lora
from .training.console import say, shown

__all__ = [
    "GenerationArguments", "GENERATION_SETTINGS", "apply_checkpoint_settings", "describe_decoding", "Predictor",
    "CheckpointArguments", "resolve_settings", "load_predictor",
]  # fmt: skip

BLANK = re.compile("|".join(re.escape(token) for token in MASK_TOKENS))


@dataclass
class GenerationArguments:
    """Decoding flags shared by finetune_generation.py (evaluation) and predict_generation.py (THUDM defaults)."""

    decode_strategy: str = field(default="beam_search", metadata={"help": "beam_search, greedy_search or sampling."})
    min_tgt_length: int = field(default=55, metadata={"help": "No end-of-piece before this many tokens."})
    num_beams: int = field(default=5, metadata={"help": "Beam width."})
    length_penalty: float = field(default=0.7, metadata={"help": "Beam score = logprob / length ** penalty."})
    length_penalty_form: str = field(default="thudm", metadata={"help": "thudm: len**lp; gnmt: ((5+len)/6)**lp."})
    no_repeat_ngram_size: int = field(default=3, metadata={"help": "Never repeat a generated n-gram of this size."})
    select_topk: bool = field(default=True, metadata={"help": "Beam candidates by top-k (else sampled)."})
    top_k: int = field(default=0, metadata={"help": "Sampling: keep the k most likely tokens (0: all)."})
    top_p: float = field(default=1.0, metadata={"help": "Sampling: nucleus mass (1.0 or 0: off)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    num_return_sequences: int = field(default=1, metadata={"help": "Answers kept per blank (prediction)."})

    def config(self, tgt_length: int, seed: Optional[int] = None) -> GenerationConfig:
        try:
            return GenerationConfig(
                decode_strategy=self.decode_strategy,
                tgt_length=tgt_length,
                min_tgt_length=self.min_tgt_length,
                num_beams=self.num_beams,
                length_penalty=self.length_penalty,
                length_penalty_form=self.length_penalty_form,
                select_topk=self.select_topk,
                no_repeat_ngram_size=self.no_repeat_ngram_size,
                top_k=self.top_k,
                top_p=self.top_p,
                temperature=self.temperature,
                num_return_sequences=self.num_return_sequences,
                seed=seed,
            )
        except ValueError as error:
            raise UserError(str(error)) from None


# Written by finetune_generation.py beside the model: the input lengths and decoding flags it was
# evaluated with, which predict_generation.py takes as its defaults.
GENERATION_SETTINGS = "generation_settings.json"


def apply_checkpoint_settings(model_dir: str, given: Iterable[str], *targets) -> Optional[str]:
    """Sets every field of `targets` (argument dataclasses) that `model_dir`'s GENERATION_SETTINGS names
    and the user did not give (`given`: flag names without dashes); returns that file's path, or None
    when the checkpoint has none."""
    settings_file = os.path.join(model_dir, GENERATION_SETTINGS)
    if not os.path.isfile(settings_file):
        return None
    with open(settings_file, encoding="utf-8") as f:
        settings = json.load(f)
    given = set(given)
    for name, value in settings.items():
        for target in targets:
            if hasattr(target, name) and name not in given:
                setattr(target, name, value)
    return settings_file


def describe_decoding(generation_args: GenerationArguments) -> str:
    g = generation_args
    if g.decode_strategy == "beam_search":
        text = f"beam search {g.num_beams} beams, length_penalty {g.length_penalty} ({g.length_penalty_form})"
    elif g.decode_strategy == "sampling":
        text = f"sampling top_k {g.top_k} top_p {g.top_p} temperature {g.temperature}"
    else:
        text = g.decode_strategy
    return f"{text}, min_tgt_length {g.min_tgt_length}, no_repeat_ngram_size {g.no_repeat_ngram_size}"


class Predictor:
    """Model (and adapter), tokenizer, input builder and decoding settings: text in, output fields out.

    `model_name_or_path` is a checkpoint directory or PaddleNLP name; `lora_path` an adapter verified
    against it (`force`: one recorded for another same-shaped base); the lengths and `mask_token` are
    GLMInputBuilder's; `dtype` float16/bfloat16 needs a GPU."""

    def __init__(self, model_name_or_path: str, generation_args: GenerationArguments, *, src_length: int,
                 tgt_length: int, mask_token: str = "[gMASK]", lora_path: Optional[str] = None, force: bool = False,
                 dtype: str = "float32", seed: Optional[int] = None, batch_size: int = 8):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise UserError(f"--dtype must be float32, float16 or bfloat16; got {dtype}")
        if dtype != "float32" and not paddle.device.is_compiled_with_cuda():
            raise UserError(f"--dtype {dtype} needs a GPU: Paddle's CPU kernels have no half precision")
        model, self.tokenizer = load_model_and_tokenizer(model_name_or_path, None if dtype == "float32" else dtype)
        if lora_path:
            model = load_lora(model, lora_path, model_name_or_path, force)
        model.eval()
        for name, length in (("src_length", src_length), ("tgt_length", tgt_length)):
            if length > model.config.max_sequence_length:
                raise UserError(f"--{name} {length} exceeds the model's max_sequence_length {model.config.max_sequence_length}")
        try:
            self.builder = GLMInputBuilder(self.tokenizer, src_length, tgt_length, mask_token)
        except ValueError as error:
            raise UserError(str(error)) from None
        self.config = generation_args.config(tgt_length, seed=seed)
        self.generator = GLMGenerator(model, self.builder.ids, default_banned_ids(model.config, self.tokenizer))
        self.batch_size = batch_size

    def predict(self, texts: List[str], progress=None):
        """Per text, the fields to add to its output row."""
        answers = generate_answers(self.generator, self.builder, texts, self.config, self.batch_size, progress)
        return [self.output_fields(text, blanks) for text, blanks in zip(texts, answers)]

    def output_fields(self, text, blanks):
        best = [candidates[0] for candidates in blanks]
        fields = {"prediction": best[0] if len(best) == 1 else best}
        if len(best) > 1:  # fill the blanks of the text, left to right
            answers = iter(best)
            fields["filled"] = BLANK.sub(lambda match: next(answers, match.group(0)), text)
        if self.config.num_return_sequences > 1:
            fields["predictions"] = blanks[0] if len(blanks) == 1 else blanks
        return fields


@dataclass
class CheckpointArguments:
    """The flags that load a checkpoint to answer with: predict_generation.py's, which server.py shares.
    Without --model_name_or_path the script's embedded default is used (`model_path`)."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "GLM checkpoint directory or PaddleNLP name (default: checkpoints/glm-tiny-chinese, the "
                          "embedded default once `python finetune_generation.py` has trained it, in the checkout)."},
    )
    lora_path: Optional[str] = field(default=None, metadata={"help": "LoRA adapter directory to apply."})
    force: bool = field(default=False, metadata={"help": "Apply an adapter recorded for another same-shaped base."})
    src_length: int = field(default=608, metadata={"help": "Source tokens, with [CLS], the mask and <|endoftext|>."})
    tgt_length: int = field(default=160, metadata={"help": "At most this many new tokens per blank."})
    mask_token: str = field(default="[gMASK]", metadata={"help": "Blank appended to a source without one."})
    dtype: str = field(default="float32", metadata={"help": "float32, or float16/bfloat16 on a GPU."})

    def model_path(self, default_model: str) -> str:
        return self.model_name_or_path or default_model


def resolve_settings(argv: List[str], args: CheckpointArguments, generation_args: GenerationArguments, default_model: str):
    """Flags not in `argv` from the checkpoint's generation_settings.json; one line says what applies."""
    given = {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}
    settings_file = apply_checkpoint_settings(args.model_path(default_model), given, args, generation_args)
    source = shown(settings_file) if settings_file else "built-in defaults"
    say(f"settings src_length {args.src_length}, tgt_length {args.tgt_length}, {describe_decoding(generation_args)} "
        f"(flags given, then {source})")


def load_predictor(args: CheckpointArguments, generation_args: GenerationArguments, default_model: str,
                   seed: Optional[int] = None, batch_size: int = 8) -> Predictor:
    """The Predictor of `args`' checkpoint; the embedded default `default_model` must have been trained."""
    path = args.model_path(default_model)
    if args.model_name_or_path is None and not os.path.isdir(path):
        raise UserError(
            f"no --model_name_or_path, and the embedded default {os.path.relpath(path)} is not trained yet: "
            "run `python finetune_generation.py` first"
        )
    return Predictor(
        path, generation_args, src_length=args.src_length, tgt_length=args.tgt_length, mask_token=args.mask_token,
        lora_path=args.lora_path, force=args.force, dtype=args.dtype, seed=seed, batch_size=batch_size,
    )

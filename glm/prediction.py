"""Answering GLM prompts with a checkpoint: the Predictor (model, adapter, input builder, generator) that
predict_generation.py and the server share, so both answer a text exactly as finetuning's evaluation
decodes it, and the flags that choose the checkpoint (their defaults from its generation_settings.json).
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import paddle

from .checkpoint import check_model_path
from .cli.arguments import flag_names
from .cli.console import say, shown
from .errors import CheckpointError, UserError
from .generation import GLMGenerator, default_banned_ids, generate_answers, rows_per_source
from .generation_settings import GenerationArguments, apply_checkpoint_settings, describe_decoding, fit_to_model
from .inputs import BLANK, GLMInputBuilder
from .loading import load_model_and_tokenizer
from .memory.estimate import DecodingLoad
from .memory.measure import current_memory_bytes, on_gpu
from .memory.plan import Plan, decoding_plan, refuse_if_it_cannot_fit
from .memory.shapes import model_shape

__all__ = [
    "Predictor", "CheckpointArguments", "resolve_settings", "load_predictor", "decoding_memory_plan", "BLANK",
    "EMBEDDED_DEFAULT_MODEL",
]  # fmt: skip

# In the checkout: where finetune_generation.py writes the embedded default, and where predict_generation.py
# and server.py look for it without --model_name_or_path.
EMBEDDED_DEFAULT_MODEL = os.path.join("checkpoints", "glm-tiny-chinese")


class Predictor:
    """Model (and adapter), tokenizer, input builder and decoding settings: text in, output fields out.

    `model_name_or_path` is a checkpoint directory or PaddleNLP name; `lora_path` an adapter verified
    against it (`force`: one recorded for another same-shaped base); the lengths and `mask_token` are
    GLMInputBuilder's; `dtype` float16/bfloat16 needs a GPU."""

    def __init__(self, model_name_or_path: str, generation_args: GenerationArguments, *, src_length: int,
                 tgt_length: int, mask_token: str = "[gMASK]", lora_path: Optional[str] = None,
                 prefix_path: Optional[str] = None, force: bool = False,
                 dtype: str = "float32", seed: Optional[int] = None, batch_size: int = 8):
        if dtype not in ("float32", "float16", "bfloat16"):
            raise UserError(f"--dtype must be float32, float16 or bfloat16; got {dtype}")
        if dtype != "float32" and not paddle.device.is_compiled_with_cuda():
            raise UserError(f"--dtype {dtype} needs a GPU: Paddle's CPU kernels have no half precision")
        model, self.tokenizer = load_model_and_tokenizer(
            model_name_or_path, None if dtype == "float32" else dtype, lora_path=lora_path, prefix_path=prefix_path, force=force,
            lengths={"src_length": src_length, "tgt_length": tgt_length})
        model.eval()
        self.builder = GLMInputBuilder(self.tokenizer, src_length, tgt_length, mask_token)
        self.config = generation_args.config(tgt_length, seed=seed)
        self.generator = GLMGenerator(model, self.builder.ids, default_banned_ids(model.config, self.tokenizer))
        self.batch_size = batch_size

    def packed_weights(self):
        """A context for many `predict` calls: the weights packed for MKL once for all of them (packing
        glm-large's weights takes longer than a short answer's steps; ModelRunner.packed_weights)."""
        return self.generator.runner.packed_weights(self.batch_size * rows_per_source(self.config))

    def predict(self, texts: List[str], progress=None, sources: Optional[Sequence[List[int]]] = None):
        """Per text, the fields to add to its output row; `sources`, the texts' built source ids when the
        caller has them already (else built here)."""
        answers = generate_answers(self.generator, self.builder, texts, self.config, self.batch_size, progress, sources)
        return [self.output_fields(text, blanks) for text, blanks in zip(texts, answers)]

    def output_fields(self, text, blanks, answers_per_blank: Optional[int] = None):
        """predict's output row for `text`: `prediction`, `filled` with several blanks, `predictions` with several
        answers per blank (`answers_per_blank`: the request's, default the predictor's num_return_sequences)."""
        best = [candidates[0] for candidates in blanks]
        fields = {"prediction": best[0] if len(best) == 1 else best}
        if len(best) > 1:  # fill the blanks of the text, left to right
            answers = iter(best)
            fields["filled"] = BLANK.sub(lambda match: next(answers, match.group(0)), text)
        if (answers_per_blank or self.config.num_return_sequences) > 1:
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
    prefix_path: Optional[str] = field(default=None, metadata={"help": "P-tuning v2 prefix directory (--prefix_tuning's output) to apply."})
    force: bool = field(default=False, metadata={"help": "Apply an adapter or prefix recorded for another same-shaped base."})
    src_length: int = field(default=608, metadata={"help": "Source tokens, with [CLS], the mask and <|endoftext|>."})
    tgt_length: int = field(default=160, metadata={"help": "At most this many new tokens per blank."})
    mask_token: str = field(default="[gMASK]", metadata={"help": "Blank appended to a source without one."})
    dtype: str = field(default="float32", metadata={"help": "float32, or float16/bfloat16 on a GPU."})
    ignore_memory_check: bool = field(
        default=False, metadata={"help": "Run even when the memory plan says decoding needs more than is available."}
    )

    def model_path(self, default_model: str) -> str:
        return self.model_name_or_path or default_model


def checked_model_path(args: CheckpointArguments, default_model: str) -> str:
    """The model to load, known to exist before anything is said of its settings; the embedded default
    `default_model` must have been trained."""
    path = args.model_path(default_model)
    if args.model_name_or_path is None and not os.path.isdir(path):
        raise UserError(
            f"no --model_name_or_path, and the embedded default {os.path.relpath(path)} is not trained yet: "
            "run `python finetune_generation.py` first"
        )
    check_model_path(path)
    return path


def resolve_settings(argv: List[str], args: CheckpointArguments, generation_args: GenerationArguments, default_model: str):
    """Flags not in `argv` from the generation_settings.json of the LoRA adapter or prefix (--lora_path,
    --prefix_path: what it was trained and evaluated with), then of the checkpoint; one line says what applies."""
    model, given = checked_model_path(args, default_model), flag_names(argv)
    adapter = args.lora_path or args.prefix_path
    settings_files = apply_checkpoint_settings([adapter, model] if adapter else [model], given, args, generation_args)
    source = ", then ".join(map(shown, settings_files)) or "built-in defaults"
    lowered = fit_to_model(model, given, ("src_length", "tgt_length"), args, generation_args)
    if lowered:
        source += f", with {', '.join(lowered)}"
    say(f"settings src_length {args.src_length}, tgt_length {args.tgt_length}, {describe_decoding(generation_args)} "
        f"(flags given, then {source})")


def decoding_memory_plan(args: CheckpointArguments, generation_args: GenerationArguments, default_model: str,
                         batch_size: int) -> Optional[Plan]:
    """The memory plan of decoding `batch_size` sources at the flags' lengths (None for a model whose shape
    is unknown: loading says what is wrong with it); refused in one line when it cannot fit."""
    try:
        shape = model_shape(args.model_path(default_model))
    except CheckpointError:
        return None
    rows = rows_per_source(generation_args.config(args.tgt_length))
    plan = decoding_plan(DecodingLoad(shape, batch_size, args.src_length, args.tgt_length, rows, half=args.dtype != "float32",
                                      gpu=on_gpu()), runtime=None if on_gpu() else current_memory_bytes())
    if not args.ignore_memory_check:
        refuse_if_it_cannot_fit(plan)
    return plan


def load_predictor(args: CheckpointArguments, generation_args: GenerationArguments, default_model: str,
                   seed: Optional[int] = None, batch_size: int = 8) -> Predictor:
    """The Predictor of `args`' checkpoint; the embedded default `default_model` must have been trained."""
    return Predictor(
        checked_model_path(args, default_model), generation_args, src_length=args.src_length, tgt_length=args.tgt_length,
        mask_token=args.mask_token, lora_path=args.lora_path, prefix_path=args.prefix_path, force=args.force, dtype=args.dtype, seed=seed, batch_size=batch_size,
    )

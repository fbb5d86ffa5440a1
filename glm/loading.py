"""The one loader of the toolkit: a GLM checkpoint with its tokenizer, the lengths a command will use checked
against the model, and an adapter verified against its base. Finetuning, prediction, evaluation, the
server and merging all load through it, so an adapter trained on another base is refused the same way
everywhere (unless `force`, for a same-shaped base)."""

from typing import Callable, Dict, Optional

from .bounds import check_lengths
from .errors import UserError
from .checkpoint import check_fits, load_checkpoint_tokenizer, load_model
from .lora import load_lora
from .modeling import GLMForConditionalGeneration
from .prefix import load_prefix
from .ptuning import load_prompt

__all__ = ["load_model_and_tokenizer"]


def load_model_and_tokenizer(path: str, dtype=None, model_class=GLMForConditionalGeneration, *,
                             lora_path: Optional[str] = None, prefix_path: Optional[str] = None,
                             prompt_path: Optional[str] = None, force: bool = False,
                             lengths: Optional[Dict[str, int]] = None, suggest: Optional[Callable[[int], str]] = None,
                             with_tokenizer: bool = True, **config_overrides):
    """(model, tokenizer) of checkpoint directory or PaddleNLP name `path`, as `model_class` (any GLM head:
    the parameter names are shared) in `dtype`, `config_overrides` replacing config.json fields.

    `lengths` ({flag: value}) must fit the model's max_sequence_length; `suggest(max_sequence_length)` may
    add a way out to the error, such as the task's recipe when it fits. `lora_path` is an adapter, refused when it does not fit this base
    or was recorded for another one (unless `force`), and applied: the model is then a LoRAModel; `prefix_path`
    likewise a P-tuning v2 prefix (glm/prefix.py), the model then a GLMPrefixModel; `prompt_path` a THUDM
    P-tuning prompt (glm/ptuning.py; `model_class` GLMForMultipleChoice), the model then a PromptTunedModel. Without
    `with_tokenizer` the tokenizer is None (a merge copies the tokenizer's files instead)."""
    model = load_model(path, dtype, model_class=model_class, **config_overrides)  # first: it says best what is wrong with a path
    tokenizer = None
    if with_tokenizer:
        tokenizer = load_checkpoint_tokenizer(path)
        check_fits(path, model, tokenizer)
    limit = model.config.max_sequence_length
    check_lengths(lengths or {}, limit, suggest(limit) if suggest else "")
    given = [name for name, value in (("--lora_path", lora_path), ("--prefix_path", prefix_path), ("--prompt_path", prompt_path)) if value]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)}: give one (a model is adapted by a LoRA adapter, a prefix or a prompt)")
    if lora_path:
        model = load_lora(model, lora_path, path, force)
    if prefix_path:
        model = load_prefix(model, prefix_path, path, force)
    if prompt_path:
        model = load_prompt(model, prompt_path, path, force)
    return model, tokenizer

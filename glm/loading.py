"""Loading a GLM checkpoint directory (or a PaddleNLP model name) with its tokenizer, checked together.

A directory holds config.json, the tokenizer files and, once trained, model_state.pdparams. The tiny
default ships without weights: a directory with a config but no weights starts from random init.
"""

import os

from paddlenlp.utils.log import logger

from .configuration import BUILTIN_CHECKPOINTS, GLMConfig
from .modeling import GLMForConditionalGeneration
from .tokenization import TokenizerError, load_tokenizer

__all__ = ["CheckpointError", "load_model", "load_model_and_tokenizer", "has_weights"]

WEIGHT_FILES = ("model_state.pdparams", "model.safetensors", "model_state.pdparams.index.json", "model.safetensors.index.json")


class CheckpointError(ValueError):
    """A model path that cannot be loaded, or a model and tokenizer that do not fit together."""


def has_weights(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES)


def load_model(path: str, dtype=None, model_class=GLMForConditionalGeneration, **config_overrides):
    """A local checkpoint directory, or one of PaddleNLP's GLM names (downloaded by PaddleNLP), as
    `model_class` (any GLM head: the parameter names are shared). `config_overrides` replace config.json
    fields (e.g. label_smoothing)."""
    if path in BUILTIN_CHECKPOINTS:
        try:
            return model_class.from_pretrained(path, dtype=dtype, **config_overrides)
        except Exception as error:  # noqa: BLE001  (a failed download surfaces as many exception types)
            raise CheckpointError(f"{path}: cannot download it ({str(error).splitlines()[0]})") from None
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path}: no such model directory (or give one of PaddleNLP's names: {', '.join(BUILTIN_CHECKPOINTS)})"
        )
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json, so this is not a GLM checkpoint directory")
    if has_weights(path):
        return model_class.from_pretrained(path, dtype=dtype, **config_overrides)
    config = GLMConfig.from_pretrained(path, **config_overrides)
    logger.info(f"{path} holds no weights: initialising GLM ({config.num_layers} layers) from its config.json")
    model = model_class(config)
    return model.to(dtype=dtype) if dtype else model


def load_model_and_tokenizer(path: str, dtype=None, model_class=GLMForConditionalGeneration, **config_overrides):
    """The model and tokenizer of `path`; the tokenizer's ids must fit the model's embeddings."""
    model = load_model(path, dtype, model_class=model_class, **config_overrides)  # first: it says best what is wrong with a path
    if path not in BUILTIN_CHECKPOINTS:
        tokenizer = load_tokenizer(path)
    else:
        from paddlenlp.transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as error:  # noqa: BLE001  (PaddleNLP raises many kinds on a failed download)
            raise TokenizerError(f"{path}: cannot load the tokenizer ({str(error).splitlines()[0]})") from None
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
            f"{model.config.vocab_size} rows; they do not belong together"
        )
    return model, tokenizer

"""Reading a GLM checkpoint directory (or a PaddleNLP model name): its weights, strictly, and its tokenizer,
checked against each other. glm.loading builds the one loader on it (lengths, adapters).

A directory holds config.json, the tokenizer files and, once trained, model_state.pdparams. The tiny
default ships without weights: a directory with a config but no weights starts from random init.
"""

import contextlib
import os

import paddle
from paddlenlp.utils.log import logger

from .configuration import BUILTIN_CHECKPOINTS, GLMConfig
from .errors import CheckpointError, TokenizerError
from .files import files_sha256
from .modeling import GLMForConditionalGeneration
from .tokenization import load_tokenizer, special_token_ids

__all__ = ["load_model", "load_checkpoint_tokenizer", "check_fits", "has_weights", "weights_sha256", "WEIGHT_FILES"]

WEIGHT_FILES = ("model_state.pdparams", "model.safetensors", "model_state.pdparams.index.json", "model.safetensors.index.json")


def has_weights(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES)


def weights_sha256(path: str) -> str:
    """SHA-256 of a checkpoint directory's model weight files (not adapters, optimizer or scheduler
    state), cached beside them (glm.files.files_sha256)."""
    names = [name for name in os.listdir(path)
             if name.endswith((".pdparams", ".safetensors")) and not name.startswith(("lora_", "prefix_", "scheduler", "optimizer", "."))]  # fmt: skip
    return files_sha256(path, names)


def check_model_path(path: str):
    """CheckpointError unless `path` is one of PaddleNLP's names or a directory with a config.json."""
    if path in BUILTIN_CHECKPOINTS:
        return
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path}: no such model directory (or give one of PaddleNLP's names: {', '.join(BUILTIN_CHECKPOINTS)})"
        )
    if not os.path.exists(os.path.join(path, "config.json")):
        for marker, what, flag in (("lora_config.json", "a LoRA adapter", "--lora_path"),
                                   ("prefix_config.json", "a P-tuning v2 prefix", "--prefix_path"),
                                   ("prompt_config.json", "a P-tuning prompt", "--prompt_path")):  # fmt: skip
            if os.path.exists(os.path.join(path, marker)):
                raise CheckpointError(f"{path} holds {what}, not a model: give its base as --model_name_or_path and "
                                      f"{path} as {flag}")
        raise CheckpointError(f"{path}: no config.json, so this is not a GLM checkpoint directory")


def load_model(path: str, dtype=None, model_class=GLMForConditionalGeneration, **config_overrides):
    """A local checkpoint directory, or one of PaddleNLP's GLM names (downloaded by PaddleNLP), as
    `model_class` (any GLM head: the parameter names are shared). `config_overrides` replace config.json
    fields (e.g. label_smoothing)."""
    if path in BUILTIN_CHECKPOINTS:
        try:
            return model_class.from_pretrained(path, dtype=dtype, **config_overrides)
        except Exception as error:  # noqa: BLE001  (a failed download surfaces as many exception types)
            raise CheckpointError(f"{path}: cannot download it ({str(error).splitlines()[0]})") from None
    check_model_path(path)
    if has_weights(path):
        return from_pretrained_strictly(model_class, path, dtype=dtype, **config_overrides)
    config = GLMConfig.from_pretrained(path, **config_overrides)
    logger.info(f"{path} holds no weights: initialising GLM ({config.num_layers} layers) from its config.json")
    model = model_class(config)
    return model.to(dtype=dtype) if dtype else model


@contextlib.contextmanager
def _loading_report(model_class, found: list):
    """Collects the (missing, unexpected, mismatched) keys PaddleNLP's from_pretrained only logs."""
    saved = vars(model_class).get("_load_pretrained_model")  # None when inherited
    original = model_class._load_pretrained_model

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        found.append(result[1:4])
        return result

    model_class._load_pretrained_model = staticmethod(recording)
    try:
        yield
    finally:
        if saved is None:
            del model_class._load_pretrained_model
        else:
            model_class._load_pretrained_model = saved


def from_pretrained_strictly(model_class, path: str, **kwargs):
    """`model_class.from_pretrained(path)`, any GLM class, where PaddleNLP only warns about parameters
    the weights lack (they stay random), hold in excess or hold in another shape: a CheckpointError naming
    the first few; an unreadable (e.g. truncated) weights file is one line too."""
    found = []
    with _loading_report(model_class, found):
        try:
            model = model_class.from_pretrained(path, **kwargs)
        except Exception as error:  # noqa: BLE001  (a torn pickle or safetensors raises many kinds)
            lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
            if lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1:  # shapes that differ
                raise CheckpointError(f"{path}: config.json and the weights do not fit: {lines[1][:300]}") from None
            first = lines[0]
            raise CheckpointError(f"{path}: cannot read its weights ({type(error).__name__}: {first[:200]})") from None
    missing, unexpected, mismatched = found[-1] if found else ([], [], [])
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameters missing from the weights ({', '.join(sorted(missing)[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected in the weights ({', '.join(sorted(unexpected)[:3])})")
    if mismatched:
        problems.append("shapes differ: " + ", ".join(f"{k} {list(a)} in the weights vs {list(b)}" for k, a, b in mismatched[:3]))
    if problems:
        raise CheckpointError(f"{path}: config.json and the weights do not fit: {'; '.join(problems)}")
    broken = next((name for name, param in model.named_parameters() if not bool(paddle.isfinite(param).all())), None)
    if broken:  # a diverged run's weights decode to empty strings: say so instead
        raise CheckpointError(f"{path}: parameter {broken} holds NaN or inf (saved by a run that diverged)")
    return model


def load_checkpoint_tokenizer(path: str):
    """The tokenizer of checkpoint directory `path`, or of one of PaddleNLP's GLM names (downloaded), checked
    for GLM's special tokens."""
    if path not in BUILTIN_CHECKPOINTS:
        return load_tokenizer(path)
    from paddlenlp.transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001  (PaddleNLP raises many kinds on a failed download)
        raise TokenizerError(f"{path}: cannot load the tokenizer ({str(error).splitlines()[0]})") from None
    special_token_ids(tokenizer)  # a GLM tokenizer
    return tokenizer


def check_fits(path: str, model, tokenizer):
    """The tokenizer's ids must fit the model's embeddings."""
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only "
            f"{model.config.vocab_size} rows; they do not belong together"
        )

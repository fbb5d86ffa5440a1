"""LoRA on GLM through `paddlenlp.peft`.

PaddleNLP's LoRAModel full-matches each target pattern against every sublayer name and refuses any
match that is not a Linear, so a pattern like `.*mlp.*` (which also names the MLP container) fails.
`linear_target_patterns` narrows user patterns to the Linear layers they name, kept as short regexes
(layer indices become `\\d+`) so `lora_config.json` stays readable.

PaddleNLP also loads any adapter onto any base: a missing weights file or weights of the wrong shape
are skipped silently, so the "adapted" model is the base. `load_lora` refuses those, and an adapter
whose recorded base (`base_fingerprint.json`, written beside the adapter at training time: the shape
fields of the config and a hash of the weight files) is not this base.
"""

import json
import os
import re
from typing import Iterable, List, Optional

import paddle
import paddle.nn as nn
from paddlenlp.peft import LoRAConfig, LoRAModel
from paddlenlp.peft.lora.lora_model import LORA_WEIGHTS_NAME
from paddlenlp.utils.log import logger

from .checkpoint import has_weights, weights_sha256
from .configuration import BUILTIN_CHECKPOINTS
from .errors import AdapterError

__all__ = [
    "DEFAULT_LORA_TARGETS", "BASE_FINGERPRINT", "SHAPE_FIELDS", "linear_target_patterns",
    "apply_lora", "base_fingerprint", "load_lora", "check_recorded_base",
]  # fmt: skip

DEFAULT_LORA_TARGETS = (".*query_key_value.*", ".*attention.dense.*")
BASE_FINGERPRINT = "base_fingerprint.json"
# The config fields that fix the shapes an adapter was trained on.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length")


def base_fingerprint(model_name_or_path: str, config) -> dict:
    """What identifies a base: its shape fields and a hash of its weight files (a PaddleNLP name
    stands for fixed weights); the hash is cached beside the weights, so a 20 GB base is read once."""
    fingerprint = {"config": {name: getattr(config, name) for name in SHAPE_FIELDS}}
    if model_name_or_path in BUILTIN_CHECKPOINTS and not os.path.isdir(model_name_or_path):
        fingerprint["name"] = model_name_or_path
    else:
        fingerprint["weights_sha256"] = weights_sha256(model_name_or_path)
    return fingerprint


def linear_target_patterns(model: nn.Layer, patterns: Iterable[str]) -> List[str]:
    patterns = list(patterns)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise AdapterError(f"LoRA target module {pattern!r} is not a regular expression ({error})") from None
    linear_names = [name for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)]
    chosen = [name for name in linear_names if any(re.fullmatch(p, name) for p in patterns)]
    if not chosen:
        raise AdapterError(
            f"LoRA target modules {patterns} match no Linear layer of the model "
            f"(Linear layers look like {linear_names[:2]})"
        )
    generalised = sorted({re.sub(r"\\\.(\d+)\\\.", r"\\.\\d+\\.", re.escape(name)) for name in chosen})
    covered = {name for name in linear_names if any(re.fullmatch(p, name) for p in generalised)}
    return generalised if covered == set(chosen) else [re.escape(name) for name in chosen]


def apply_lora(model, rank=8, alpha=16, dropout=0.0, target_modules=DEFAULT_LORA_TARGETS, base_model_name_or_path=None):
    """Wrap `model` in LoRA adapters on the named Linear layers; only the adapters train."""
    config = LoRAConfig(
        base_model_name_or_path=base_model_name_or_path,
        target_modules=linear_target_patterns(model, target_modules),
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        merge_weights=False,
        dtype=str(model.glm.word_embeddings.weight.dtype).replace("paddle.", ""),
    )
    lora_model = LoRAModel(model, config)
    lora_model.mark_only_lora_as_trainable()
    return lora_model


def check_recorded_base(lora_path: str, base_path: Optional[str], config, force: bool, kind: str = "adapter"):
    """AdapterError unless the base recorded beside the adapter (or prefix: `kind`) in `lora_path` has the
    shapes of `config` and, when `base_path` is given, is that base (unless `force`: same shapes suffice)."""
    recorded_file = os.path.join(lora_path, BASE_FINGERPRINT)
    if os.path.exists(recorded_file):
        with open(recorded_file, encoding="utf-8") as f:
            recorded = json.load(f)
    elif os.path.exists(os.path.join(lora_path, "config.json")):  # an adapter saved before fingerprints
        logger.warning(f"{lora_path} records no base ({BASE_FINGERPRINT}): only its shapes can be checked")
        with open(os.path.join(lora_path, "config.json"), encoding="utf-8") as f:
            recorded, base_path = {"config": json.load(f)}, None
    else:
        logger.warning(f"{lora_path} records no base ({BASE_FINGERPRINT}): only its shapes can be checked")
        return
    differing = [f"{name} {recorded['config'].get(name)} (the {kind}'s base) vs {getattr(config, name)} (this base)"
                 for name in SHAPE_FIELDS if recorded["config"].get(name) != getattr(config, name)]  # fmt: skip
    if differing:
        raise AdapterError(f"{kind} {lora_path} was trained on a different GLM: {', '.join(differing)}")
    if base_path is None:
        return
    if recorded == base_fingerprint(base_path, config):
        return
    weights = "it holds no weights: a random init" if os.path.isdir(base_path) and not has_weights(base_path) else "other weights"
    message = f"{kind} {lora_path} was trained on another base than {base_path} (same shapes; {weights})"
    if not force:
        raise AdapterError(f"{message}; --force applies it anyway")
    logger.warning(f"{message}; applying it anyway (--force)")


def _check_adapter_fits(lora_model: LoRAModel, lora_path: str):
    adapter_weights = paddle.load(os.path.join(lora_path, LORA_WEIGHTS_NAME), return_numpy=True)
    expected = {name: list(param.shape) for name, param in lora_model.get_trainable_state_dict().items()}
    for name, shape in expected.items():
        if name not in adapter_weights:
            raise AdapterError(f"adapter {lora_path} has no {name}: it was trained on a different base")
        if list(adapter_weights[name].shape) != shape:
            raise AdapterError(
                f"adapter {lora_path} holds {name} of shape {list(adapter_weights[name].shape)}, "
                f"the base needs {shape}: it was trained on a different base"
            )
    unexpected = sorted(set(adapter_weights) - set(expected))
    if unexpected:
        raise AdapterError(f"adapter {lora_path} holds {unexpected[0]}, which the base does not have")


def load_lora(model, lora_path: str, base_path: Optional[str] = None, force: bool = False) -> LoRAModel:
    """`model` with the adapter saved by `LoRAModel.save_pretrained` in `lora_path`, refused (AdapterError)
    when a file is missing, a shape does not fit, or the recorded base is not `base_path` (unless `force`)."""
    for required in ("lora_config.json", LORA_WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(lora_path, required)):
            raise AdapterError(f"{lora_path}: no {required} (expected a LoRA adapter directory)")
    check_recorded_base(lora_path, base_path, model.config, force)
    lora_model = LoRAModel.from_pretrained(model, lora_path)
    _check_adapter_fits(lora_model, lora_path)
    return lora_model

"""LoRA on GLM through `paddlenlp.peft`.

PaddleNLP's LoRAModel full-matches each target pattern against every sublayer name and refuses any
match that is not a Linear, so a pattern like `.*mlp.*` (which also names the MLP container) fails.
`linear_target_patterns` narrows user patterns to the Linear layers they name, kept as short regexes
(layer indices become `\\d+`) so `lora_config.json` stays readable.
"""

import re
from typing import Iterable, List

import paddle.nn as nn
from paddlenlp.peft import LoRAConfig, LoRAModel

__all__ = ["DEFAULT_LORA_TARGETS", "linear_target_patterns", "apply_lora", "load_lora"]

DEFAULT_LORA_TARGETS = (".*query_key_value.*", ".*attention.dense.*")


def linear_target_patterns(model: nn.Layer, patterns: Iterable[str]) -> List[str]:
    patterns = list(patterns)
    linear_names = [name for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)]
    chosen = [name for name in linear_names if any(re.fullmatch(p, name) for p in patterns)]
    if not chosen:
        raise ValueError(
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


def load_lora(model, lora_path: str) -> LoRAModel:
    """Load adapter weights saved by `LoRAModel.save_pretrained` onto `model`."""
    return LoRAModel.from_pretrained(model, lora_path)

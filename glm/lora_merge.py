"""Merge a LoRA adapter into its base GLM: a plain checkpoint whose logits equal base + adapter.

The merge itself is PaddleNLP's: a `LoRALinear` with `merge_weights` set adds `lora_A @ lora_B * scaling`
to its weight when switched to eval, and `LoRAModel.restore_original_model` swaps the LoRA layers back
for plain Linears holding those weights. What PaddleNLP does not do is refuse an adapter that does not
fit the base: `set_state_dict` skips (with a warning it then filters out) every adapter weight of the
wrong shape, so an adapter from another model "loads" as a no-op. `merge_lora` checks the base's config
against the one saved beside the adapter, and every adapter weight's name and shape, before merging.
"""

import os
import shutil

import paddle
from paddlenlp.peft.lora import LoRALinear
from paddlenlp.peft.lora.lora_model import LORA_WEIGHTS_NAME

from .configuration import GLMConfig
from .lora import load_lora
from .modeling import GLMForConditionalGeneration

__all__ = ["LoRAMergeError", "merge_lora", "merge_lora_checkpoint"]

# The fields that fix the shapes an adapter was trained on (LoRAModel.save_pretrained also writes the
# base's config.json beside the adapter).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length")
# PaddleNLP's GLM tokenizers: GLMChineseTokenizer (cog-pretrain.model), GLMGPT2Tokenizer, GLMBertTokenizer.
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "cog-pretrain.model", "vocab.json", "merges.txt", "vocab.txt",
)  # fmt: skip


class LoRAMergeError(ValueError):
    """A base or adapter that cannot be merged; the message is one line written for the user."""


def _check_adapter_fits(lora_model, lora_path: str):
    adapter_weights = paddle.load(os.path.join(lora_path, LORA_WEIGHTS_NAME), return_numpy=True)
    expected = {name: list(param.shape) for name, param in lora_model.get_trainable_state_dict().items()}
    trained_on = lora_model.lora_config.base_model_name_or_path
    origin = f" (trained on {trained_on})" if trained_on else ""
    for name, shape in expected.items():
        if name not in adapter_weights:
            raise LoRAMergeError(f"adapter {lora_path}{origin} has no {name}: it was trained on a different base")
        if list(adapter_weights[name].shape) != shape:
            raise LoRAMergeError(
                f"adapter {lora_path}{origin} holds {name} of shape {list(adapter_weights[name].shape)}, "
                f"the base needs {shape}: it was trained on a different base"
            )
    unexpected = sorted(set(adapter_weights) - set(expected))
    if unexpected:
        raise LoRAMergeError(f"adapter {lora_path}{origin} holds {unexpected[0]}, which the base does not have")


def merge_lora(model: GLMForConditionalGeneration, lora_path: str) -> GLMForConditionalGeneration:
    """`model` with the adapter in `lora_path` folded into its Linear weights (no LoRA layers left)."""
    for required in ("lora_config.json", LORA_WEIGHTS_NAME):
        if not os.path.exists(os.path.join(lora_path, required)):
            raise LoRAMergeError(f"{lora_path}: no {required} (expected a LoRAModel.save_pretrained directory)")
    adapter_config = os.path.join(lora_path, "config.json")
    if os.path.exists(adapter_config):
        trained = GLMConfig.from_pretrained(lora_path)
        differing = [f"{field} {getattr(trained, field)} (adapter) vs {getattr(model.config, field)} (base)"
                     for field in SHAPE_FIELDS if getattr(trained, field) != getattr(model.config, field)]  # fmt: skip
        if differing:
            raise LoRAMergeError(
                f"adapter {lora_path} was trained on a different GLM than the base: {', '.join(differing)}"
            )
    lora_model = load_lora(model, lora_path)
    _check_adapter_fits(lora_model, lora_path)

    # Merge in float32: exact for float32 bases, and Paddle's CPU has no half-precision matmul (an adapter
    # trained in bfloat16 on a GPU is merged on a CPU).
    lora_model.model.to(dtype="float32")
    for layer in lora_model.model.sublayers():
        if isinstance(layer, LoRALinear):
            layer.merge_weights = True
    lora_model.eval()  # each LoRALinear adds lora_A @ lora_B * scaling to its weight
    # restore_original_model first switches back to train mode (un-merging) when the config asks to merge.
    lora_model.lora_config.merge_weights = False
    merged = lora_model.restore_original_model()
    leftover = [name for name, _ in merged.named_parameters() if "lora_" in name]
    if leftover:
        raise LoRAMergeError(f"adapter {lora_path}: layer {leftover[0]} is a LoRA type PaddleNLP cannot merge back")
    for param in merged.parameters():
        param.stop_gradient = False  # LoRAModel froze the base; the merged model is an ordinary one
    return merged


def merge_lora_checkpoint(model_name_or_path: str, lora_path: str, output_dir: str):
    """Write base + adapter as a plain checkpoint (weights, config, the base's tokenizer files)."""
    if not os.path.exists(os.path.join(model_name_or_path, "config.json")):
        raise LoRAMergeError(f"{model_name_or_path}: no config.json (expected a GLM checkpoint directory)")
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise LoRAMergeError(f"{output_dir} exists and is not empty; choose a new --output_dir")
    model = merge_lora(GLMForConditionalGeneration.from_pretrained(model_name_or_path), lora_path)
    model.save_pretrained(output_dir)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(model_name_or_path, name)):
            shutil.copy(os.path.join(model_name_or_path, name), output_dir)

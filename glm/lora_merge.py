"""Merge a LoRA adapter into its base GLM: a plain checkpoint whose logits equal base + adapter.

The merge itself is PaddleNLP's: a `LoRALinear` with `merge_weights` set adds `lora_A @ lora_B * scaling`
to its weight when switched to eval, and `LoRAModel.restore_original_model` swaps the LoRA layers back
for plain Linears holding those weights. `glm.lora.load_lora` first refuses an adapter that does not fit
the base (PaddleNLP would load it as a no-op) or whose recorded base is another model.
"""

import os
import shutil

from paddlenlp.peft.lora import LoRALinear

from .files import staged_directory
from .loading import load_model
from .lora import AdapterError, load_lora
from .modeling import GLMForConditionalGeneration
from .tokenization import TOKENIZER_FILES

__all__ = ["LoRAMergeError", "merge_lora", "merge_lora_checkpoint"]


class LoRAMergeError(AdapterError):
    """A base or adapter that cannot be merged; the message is one line written for the user."""


def merge_lora(model: GLMForConditionalGeneration, lora_path: str, base_path=None, force=False) -> GLMForConditionalGeneration:
    """`model` (loaded from `base_path`) with the adapter in `lora_path` folded into its Linear weights."""
    lora_model = load_lora(model, lora_path, base_path, force)

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


def merge_lora_checkpoint(model_name_or_path: str, lora_path: str, output_dir: str, force: bool = False,
                          report=print):
    """Write base + adapter as a plain checkpoint (weights, config, the base's tokenizer files); `report`
    prints the notes (a killed run's leftovers removed)."""
    if not os.path.exists(os.path.join(model_name_or_path, "config.json")):
        raise LoRAMergeError(f"{model_name_or_path}: no config.json (expected a GLM checkpoint directory)")
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise LoRAMergeError(f"{output_dir} exists and is not empty; choose a new --output_dir")
    model = merge_lora(load_model(model_name_or_path), lora_path, model_name_or_path, force)
    # Written beside output_dir and renamed onto it (an empty directory) whole: a kill leaves no torn checkpoint.
    with staged_directory(output_dir, report) as staged:
        model.save_pretrained(staged)
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(model_name_or_path, name)):
                shutil.copy(os.path.join(model_name_or_path, name), staged)

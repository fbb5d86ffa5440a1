"""Merge a LoRA adapter into its base GLM: a plain checkpoint whose logits equal base + adapter.

The merge itself is PaddleNLP's: a `LoRALinear` with `merge_weights` set adds `lora_A @ lora_B * scaling`
to its weight when switched to eval, and `LoRAModel.restore_original_model` swaps the LoRA layers back
for plain Linears holding those weights. The loader (glm.loading) first refuses an adapter that does not
fit the base (PaddleNLP would load it as a no-op) or whose recorded base is another model.
"""

import os
import shutil

from paddlenlp.peft import LoRAModel
from paddlenlp.peft.lora import LoRALinear

from .errors import LoRAMergeError
from .files import staged_directory
from .loading import load_model_and_tokenizer
from .modeling import GLMForConditionalGeneration
from .tokenization import TOKENIZER_FILES

__all__ = ["merge_lora", "merge_lora_checkpoint"]


def merge_lora(lora_model: LoRAModel, lora_path: str) -> GLMForConditionalGeneration:
    """The base of `lora_model` (the adapter in `lora_path`, applied) with the adapter folded into its
    Linear weights."""
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
    lora_model, _ = load_model_and_tokenizer(model_name_or_path, lora_path=lora_path, force=force, with_tokenizer=False)
    model = merge_lora(lora_model, lora_path)
    # Written beside output_dir and renamed onto it (an empty directory) whole: a kill leaves no torn checkpoint.
    with staged_directory(output_dir, report) as staged:
        model.save_pretrained(staged)
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(model_name_or_path, name)):
                shutil.copy(os.path.join(model_name_or_path, name), staged)

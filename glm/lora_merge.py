"""Merge a LoRA adapter into its base GLM: a plain checkpoint whose logits equal base + adapter.

The merge itself is PaddleNLP's: a `LoRALinear` with `merge_weights` set adds `lora_A @ lora_B * scaling`
to its weight when switched to eval, and `LoRAModel.restore_original_model` swaps the LoRA layers back
for plain Linears holding those weights. `glm.lora.load_lora` first refuses an adapter that does not fit
the base (PaddleNLP would load it as a no-op) or whose recorded base is another model.
"""

import os
import shutil

from paddlenlp.peft.lora import LoRALinear

from .loading import load_model
from .lora import AdapterError, load_lora
from .modeling import GLMForConditionalGeneration

__all__ = ["LoRAMergeError", "merge_lora", "merge_lora_checkpoint"]

# PaddleNLP's GLM tokenizers: GLMChineseTokenizer (cog-pretrain.model), GLMGPT2Tokenizer, GLMBertTokenizer.
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "cog-pretrain.model", "vocab.json", "merges.txt", "vocab.txt",
)  # fmt: skip


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


def merge_lora_checkpoint(model_name_or_path: str, lora_path: str, output_dir: str, force: bool = False):
    """Write base + adapter as a plain checkpoint (weights, config, the base's tokenizer files)."""
    if not os.path.exists(os.path.join(model_name_or_path, "config.json")):
        raise LoRAMergeError(f"{model_name_or_path}: no config.json (expected a GLM checkpoint directory)")
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise LoRAMergeError(f"{output_dir} exists and is not empty; choose a new --output_dir")
    model = merge_lora(load_model(model_name_or_path), lora_path, model_name_or_path, force)
    # Written beside output_dir and renamed onto it (an empty directory) whole: a kill leaves no torn checkpoint.
    staged = f"{os.path.abspath(output_dir).rstrip(os.sep)}.partial-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(model_name_or_path, name)):
            shutil.copy(os.path.join(model_name_or_path, name), staged)
    os.replace(staged, output_dir)

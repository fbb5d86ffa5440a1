"""The shape of a GLM, all the memory planner needs of a model: from a checkpoint's config.json, or built in
for THUDM's released checkpoints (offline: no download)."""

import json
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import CheckpointError

__all__ = ["ModelShape", "BUILTIN_SHAPES", "model_shape", "uses_dropout"]


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_sequence_length: int
    block_position_encoding: bool = True

    def parameters(self) -> int:
        """Every parameter of GLMForConditionalGeneration (the LM head is the word embeddings)."""
        h = self.hidden_size
        position_rows = self.max_sequence_length + 1 if self.block_position_encoding else self.max_sequence_length
        positions = position_rows * h * (2 if self.block_position_encoding else 1)
        layer = 12 * h * h + 13 * h  # qkv, dense, h->4h, 4h->h with biases; two LayerNorms
        return self.vocab_size * h + positions + self.num_layers * layer + 2 * h

    def _linears(self, patterns):
        """(in, out) of one layer's Linear weights whose names a LoRA target regex matches."""
        import re

        h = self.hidden_size
        linears = {"attention.query_key_value": (h, 3 * h), "attention.dense": (h, h),
                   "mlp.dense_h_to_4h": (h, 4 * h), "mlp.dense_4h_to_h": (4 * h, h)}  # fmt: skip
        name = "glm.transformer.layers.0.{}"
        return [dims for linear, dims in linears.items() if any(re.fullmatch(p, name.format(linear)) for p in patterns)]

    def linear_parameters(self, patterns) -> int:
        """Parameters of one layer's Linear weights whose names a LoRA target regex matches (in + out, the
        size of a rank-1 adapter on each)."""
        return sum(i + o for i, o in self._linears(patterns))

    def linear_weights(self, patterns) -> int:
        """Elements of one layer's Linear weights whose names a LoRA target regex matches (in x out)."""
        return sum(i * o for i, o in self._linears(patterns))


# THUDM's releases (PaddleNLP's GLM_PRETRAINED_INIT_CONFIGURATION, THUDM/GLM's model configs).
BUILTIN_SHAPES = {
    "THUDM/glm-large-chinese": ModelShape(24, 1024, 16, 50048, 1024),
    "THUDM/glm-10b-chinese": ModelShape(48, 4096, 64, 50048, 1024),
    "THUDM/glm-large": ModelShape(24, 1024, 16, 30592, 512),
    "THUDM/glm-515m": ModelShape(30, 1152, 18, 30592, 512),
    "THUDM/glm-2b": ModelShape(36, 2048, 32, 50304, 1024),
    "THUDM/glm-10b": ModelShape(48, 4096, 64, 50304, 1024),
}


def model_shape(model_name_or_path: str) -> ModelShape:
    """The shape of a checkpoint directory (its config.json) or of a built-in name."""
    config_file = os.path.join(model_name_or_path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        try:
            return ModelShape(config["num_layers"], config["hidden_size"], config["num_attention_heads"],
                              config["vocab_size"], config["max_sequence_length"],
                              config.get("block_position_encoding", True))
        except KeyError as missing:
            raise CheckpointError(f"{config_file}: no {missing} (not a GLM config)") from None
    shape: Optional[ModelShape] = BUILTIN_SHAPES.get(model_name_or_path)
    if shape is None:
        raise CheckpointError(f"{model_name_or_path}: no config.json there, and not one of the built-in shapes "
                              f"({', '.join(BUILTIN_SHAPES)})")
    return shape


def uses_dropout(model_name_or_path: str) -> bool:
    """Whether the model trains with dropout (its masks and dropped copies are kept for backward); THUDM's
    releases do (0.1)."""
    config_file = os.path.join(model_name_or_path, "config.json")
    if not os.path.isfile(config_file):
        return True
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    names = ("embedding_dropout_prob", "attention_dropout_prob", "output_dropout_prob")
    return any(config.get(name, 0.1) > 0 for name in names)

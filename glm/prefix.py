"""P-tuning v2 (deep prompts, prefix tuning) on GLM through `paddlenlp.peft.PrefixModelForCausalLM`.

A prefix is N trainable keys and values per layer that every real position attends to and that attend to
nothing themselves. GLM's attention already takes per-layer memory, in one of two forms: THUDM's `mems`
(the hidden states entering a layer, which the layer projects with its own query_key_value) or, here, the
cache of keys and values. The prefix is keys and values, for three reasons: it is P-tuning v2's own form
(Liu et al. 2022; its keys and values are free, where states are bound to the frozen projection's
image), it is what PaddleNLP's PrefixModelForCausalLM produces, so the Trainer saves and resumes it as a
peft model, and it is what decoding keeps per layer (glm/model_runner.py), so a prefix goes into the
decoding cache as it is, once per source: beams and samples of a source share it.

Positions: real tokens keep theirs (the prefix has none). Masks: every row sees the prefix
(`prefixed_attention_mask`). `--prefix_projection` trains the prefix through P-tuning v2's
reparameterization MLP (Embedding N x hidden -> Linear -> tanh -> Linear -> layers x 2 x hidden); the final
model is saved folded (`GLMPrefixModel.fold`): the MLP's output as a plain prefix, so predict, evaluate and
the server never run the MLP. Checkpoints keep the MLP (a resumed run trains it on). Beside the prefix:
`base_fingerprint.json`, the base it was trained on (as for LoRA adapters), checked when it is loaded.
"""

import json
import os
from typing import List, Optional

import paddle
import paddle.nn as nn
from paddlenlp.peft import PrefixConfig, PrefixModelForCausalLM
from paddlenlp.transformers.model_utils import dtype_guard
from paddlenlp.utils.env import PAST_KEY_VALUES_FILE_NAME, PREFIX_CONFIG_NAME, PREFIX_WEIGHTS_NAME

from .decoding_cache import LayerCache
from .errors import AdapterError
from .lora import check_recorded_base
from .modeling import prefixed_attention_mask

__all__ = ["GLMPrefixModel", "apply_prefix", "load_prefix", "prefix_model", "prefix_parameters", "PREFIX_CONFIG_NAME", "PREFIX_WEIGHTS_NAME"]


def layer_caches(past_key_values) -> List[LayerCache]:
    """PrefixModelForCausalLM's [B, N, layers * 2, heads, head_dim] as GLM's cache: per layer (keys, values),
    each [B, heads, N, head_dim]. The layers x 2 axis holds every layer's keys, then every layer's values (the
    order PaddleNLP's save_pretrained writes its past_key_values file in)."""
    layers = past_key_values.shape[2] // 2
    states = past_key_values.transpose([2, 0, 3, 1, 4])  # [layers * 2, B, heads, N, head_dim]
    return [(states[layer], states[layers + layer]) for layer in range(layers)]


def _pad_attention_mask(input_shape, num_prefix_tokens: int, attention_mask):
    return prefixed_attention_mask(attention_mask, num_prefix_tokens)


class GLMPrefixModel(PrefixModelForCausalLM):
    """PaddleNLP's prefix model with GLM's cache layout and masks, for any GLM head (generation, multiple
    choice): `model(**inputs)` runs the head with the prefix as its memory."""

    def __init__(self, model, prefix_config: PrefixConfig, postprocess_past_key_value=None, pad_attention_mask=None):
        # PaddleNLP's from_pretrained passes its two callbacks positionally; GLM's layout and masks are fixed.
        super().__init__(model, prefix_config, layer_caches, _pad_attention_mask)

    @property
    def num_prefix_tokens(self) -> int:
        return self.prefix_config.num_prefix_tokens

    def layer_caches(self, rows: int) -> List[LayerCache]:
        """The prefix as GLM's cache of `rows` rows (per layer keys and values [rows, heads, N, head_dim])."""
        return self._get_past_key_values(rows)

    def over(self, head) -> "GLMPrefixModel":
        """This prefix (the same encoder, shared) on another head over the same backbone (e.g. the served
        generation model's GLMForMultipleChoice for /score)."""
        other = GLMPrefixModel(head, PrefixConfig(**self.prefix_config.to_dict()))
        other.prefix_encoder = self.prefix_encoder
        other.eval() if not self.training else other.train()
        return other

    def backbone_inputs(self, rows: int, attention_mask):
        """(cache, attention_mask) for calling the wrapped GLM's backbone directly on `rows` rows: the prefix
        as its memory, the mask widened over it."""
        return self.layer_caches(rows), prefixed_attention_mask(attention_mask, self.num_prefix_tokens)

    @paddle.no_grad()
    def fold(self):
        """Replace the reparameterization MLP by its output: the same prefix (in eval mode, where dropout is
        off), as a plain embedding. A no-op on a prefix without projection."""
        if not self.prefix_config.prefix_projection:
            return
        was_training = self.prefix_encoder.training
        self.prefix_encoder.eval()
        folded = self.prefix_encoder(self.prefix_tokens.unsqueeze(0))[0]  # [N, layers * 2 * hidden]
        self.prefix_config.prefix_projection = False
        self.prefix_config.prefix_projection_hidden_size = None
        with dtype_guard(self.prefix_config.dtype):
            embedding = nn.Embedding(folded.shape[0], folded.shape[1])
        embedding.weight.set_value(folded)
        self.prefix_encoder = nn.Sequential(embedding, nn.Dropout(p=self.prefix_config.prefix_dropout))
        self.prefix_encoder.train() if was_training else self.prefix_encoder.eval()
        embedding.weight.stop_gradient = False

    def fold_like(self, directory: str):
        """Fold the MLP away when the prefix saved in `directory` (to be loaded into this model) was saved folded."""
        with open(os.path.join(directory, PREFIX_CONFIG_NAME), encoding="utf-8") as f:
            if not json.load(f).get("prefix_projection"):
                self.fold()

    def save_pretrained(self, save_directory: str, **kwargs):
        # PaddleNLP writes its past_key_values .npy file beside the weights, from the encoder in whatever
        # mode it is in; the prefix weights and config are all a GLM prefix needs, so it is left out.
        super().save_pretrained(save_directory, **kwargs)
        extra = os.path.join(save_directory, PAST_KEY_VALUES_FILE_NAME)
        if os.path.exists(extra):
            os.remove(extra)


def prefix_parameters(layers: int, hidden: int, tokens: int, projection: bool, projection_hidden: Optional[int]) -> int:
    """Trainable parameters of a prefix: the keys and values themselves, or the reparameterization's
    embedding and MLP."""
    per_token = layers * 2 * hidden
    if not projection:
        return tokens * per_token
    inner = projection_hidden or hidden
    return tokens * hidden + (hidden + 1) * inner + (inner + 1) * per_token


def prefix_model(model) -> Optional[GLMPrefixModel]:
    """`model` when it is a prefix-tuned GLM, else None."""
    return model if isinstance(model, GLMPrefixModel) else None


def apply_prefix(model, num_prefix_tokens: int, projection: bool = False, projection_hidden_size: Optional[int] = None):
    """`model` (any GLM head) with a new trainable prefix of `num_prefix_tokens` per layer; the base is frozen."""
    config = model.config
    prefix_config = PrefixConfig(
        num_prefix_tokens=num_prefix_tokens, num_attention_heads=config.num_attention_heads,
        num_hidden_layers=config.num_layers, hidden_size=config.hidden_size, prefix_projection=projection,
        prefix_projection_hidden_size=(projection_hidden_size or config.hidden_size) if projection else None,
        prefix_dropout=0.0, dtype=str(model.glm.word_embeddings.weight.dtype).replace("paddle.", ""),
    )  # fmt: skip
    return GLMPrefixModel(model, prefix_config)


def _check_prefix_fits(prefix_path: str, model):
    with open(os.path.join(prefix_path, PREFIX_CONFIG_NAME), encoding="utf-8") as f:
        recorded = json.load(f)
    config = model.config
    wanted = {"num_hidden_layers": config.num_layers, "hidden_size": config.hidden_size,
              "num_attention_heads": config.num_attention_heads}  # fmt: skip
    differing = [f"{name} {recorded.get(name)} (prefix) vs {value} (this base)"
                 for name, value in wanted.items() if recorded.get(name) != value]  # fmt: skip
    if differing:
        raise AdapterError(f"prefix {prefix_path} was trained on a different GLM: {', '.join(differing)}")
    if not recorded.get("num_prefix_tokens"):
        raise AdapterError(f"prefix {prefix_path}: prefix_config.json names no num_prefix_tokens")
    weights = paddle.load(os.path.join(prefix_path, PREFIX_WEIGHTS_NAME), return_numpy=True)
    per_token = config.num_layers * 2 * config.hidden_size
    expected = {"0.weight": [recorded["num_prefix_tokens"], per_token if not recorded.get("prefix_projection") else config.hidden_size]}
    for name, shape in expected.items():
        if name not in weights or list(weights[name].shape) != shape:
            found = list(weights[name].shape) if name in weights else "nothing"
            raise AdapterError(f"prefix {prefix_path} holds {found} as {name}, the base needs {shape}")


def load_prefix(model, prefix_path: str, base_path: Optional[str] = None, force: bool = False) -> GLMPrefixModel:
    """`model` with the prefix saved in `prefix_path`, refused (AdapterError) when a file is missing, a shape
    does not fit, or the recorded base is not `base_path` (unless `force`)."""
    if not os.path.isdir(prefix_path):
        raise AdapterError(f"{prefix_path}: no such prefix directory")
    for required in (PREFIX_CONFIG_NAME, PREFIX_WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(prefix_path, required)):
            raise AdapterError(f"{prefix_path}: no {required} (expected a prefix directory: prefix_config.json and "
                               f"{PREFIX_WEIGHTS_NAME}, as --prefix_tuning writes)")
    check_recorded_base(prefix_path, base_path, model.config, force, kind="prefix")
    _check_prefix_fits(prefix_path, model)
    prefixed = GLMPrefixModel.from_pretrained(model, prefix_path)
    prefixed.eval()
    return prefixed

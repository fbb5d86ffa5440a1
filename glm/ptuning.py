"""THUDM's P-tuning for cloze tasks (`model/prompt.py` PromptSpell, `tasks/superglue/pvp.py`): N continuous
prompt tokens in the row's pattern, whose word embeddings are replaced by the output of a prompt encoder
over N trainable vectors: a 2-layer bidirectional LSTM then an MLP (`lstm`), an MLP (`mlp`), or the vectors
as they are (`none`). Their position ids are the pattern's, like any token's. The input builder puts them
in the pattern (glm.inputs.MultipleChoiceBuilder, `prompt_placement`); this module holds the encoder and the
model that uses it.

With `freeze_backbone` only the prompt trains and only it is saved (prompt_config.json, the encoder's
weights, the base's fingerprint, as for LoRA adapters and prefixes); otherwise the whole model trains and
the output directory is a full checkpoint with the prompt beside it, which evaluate.py finds by itself.
"""

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import paddle
import paddle.nn as nn

from .errors import AdapterError
from .lora import check_recorded_base

__all__ = ["PROMPT_ENCODERS", "PROMPT_CONFIG", "PROMPT_WEIGHTS", "PromptConfig", "PromptSpell", "PromptTunedModel",
           "load_prompt", "has_prompt", "prompt_parameters", "builder_prompt",
           "checked_prompt_config"]

PROMPT_ENCODERS = ("lstm", "mlp", "none")
PROMPT_CONFIG = "prompt_config.json"
PROMPT_WEIGHTS = "prompt_model_state.pdparams"


@dataclass
class PromptConfig:
    num_prompt_tokens: int
    prompt_encoder: str  # one of PROMPT_ENCODERS
    prompt_placement: str  # where the builder puts the tokens (glm.inputs.PROMPT_PLACEMENTS)
    hidden_size: int
    frozen_backbone: bool


class PromptSpell(nn.Layer):
    """N trainable vectors [N, hidden] through the chosen encoder: the prompt tokens' input embeddings."""

    def __init__(self, num_tokens: int, hidden_size: int, encoder: str):
        super().__init__()
        if encoder not in PROMPT_ENCODERS:
            raise ValueError(f"prompt encoder must be one of {', '.join(PROMPT_ENCODERS)}; got {encoder}")
        self.encoder = encoder
        self.spell_embeddings = nn.Embedding(num_tokens, hidden_size)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(hidden_size, hidden_size, num_layers=2, direction="bidirect")
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size))
        elif encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self):
        prompt = self.spell_embeddings.weight.unsqueeze(0)  # [1, N, hidden]
        if self.encoder == "lstm":
            prompt = self.lstm_head(prompt)[0]  # [1, N, 2 * hidden]
        if self.encoder in ("lstm", "mlp"):
            prompt = self.mlp_head(prompt)
        return prompt[0]


class PromptTunedModel(nn.Layer):
    """A GLMForMultipleChoice whose inputs' prompt positions take the PromptSpell's output. Called as the
    head is, plus `prompt_positions` [B, N] (where the builder put the prompt tokens of each row)."""

    def __init__(self, model, config: PromptConfig):
        super().__init__()
        self.model, self.prompt_config = model, config
        self.config = model.config
        self.spell = PromptSpell(config.num_prompt_tokens, config.hidden_size, config.prompt_encoder)
        # THUDM's init_embedding: each vector a random word's embedding among the first 5000 ids, so the
        # prompt starts at the scale of the real tokens around it.
        words = model.glm.word_embeddings.weight
        rows = paddle.randint(0, min(5000, words.shape[0]), [config.num_prompt_tokens])
        self.spell.spell_embeddings.weight.set_value(paddle.gather(words, rows).astype(self.spell.spell_embeddings.weight.dtype))
        if config.frozen_backbone:
            for weight in self.model.parameters():
                weight.stop_gradient = True

    def forward(self, input_ids, position_ids=None, attention_mask=None, choice_ids=None, choice_indices=None,
                labels=None, prompt_positions=None, return_dict=None):
        embeddings = self.model.glm.word_embeddings(input_ids)  # [B, L, hidden]
        if prompt_positions is not None:
            rows = paddle.arange(input_ids.shape[0], dtype="int64").unsqueeze(1).expand(prompt_positions.shape)
            index = paddle.stack([rows, prompt_positions.astype("int64")], axis=-1).reshape([-1, 2])  # [B*N, 2]
            prompt = self.spell().astype(embeddings.dtype)
            prompt = prompt.unsqueeze(0).expand([input_ids.shape[0]] + prompt.shape).reshape([-1, prompt.shape[-1]])
            embeddings = paddle.scatter_nd_add(embeddings * _keep_mask(embeddings, index), index, prompt)
        return self.model(input_ids, position_ids, attention_mask, choice_ids, choice_indices, labels,
                          return_dict=return_dict, inputs_embeds=embeddings)

    def save_pretrained(self, directory: str):
        """The prompt (config and encoder weights) into `directory`; the backbone too when it trained (the
        trainer writes a frozen base's fingerprint beside it)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, PROMPT_CONFIG), "w", encoding="utf-8") as f:
            json.dump(asdict(self.prompt_config), f, indent=2)
        paddle.save(self.spell.state_dict(), os.path.join(directory, PROMPT_WEIGHTS))
        if not self.prompt_config.frozen_backbone:
            self.model.save_pretrained(directory)

    def load_saved(self, directory: str):
        """The weights `save_pretrained` wrote in `directory` (a checkpoint or the final model)."""
        self.spell.set_state_dict(paddle.load(os.path.join(directory, PROMPT_WEIGHTS)))
        if not self.prompt_config.frozen_backbone:
            self.model.set_state_dict(paddle.load(os.path.join(directory, "model_state.pdparams")))


def _keep_mask(embeddings, index):
    """1 everywhere but at the prompt positions `index` [K, 2], where the prompt replaces the word embedding."""
    hit = paddle.scatter_nd_add(paddle.zeros(embeddings.shape[:2], dtype=embeddings.dtype), index,
                                paddle.ones([index.shape[0]], dtype=embeddings.dtype))
    return (1.0 - hit).unsqueeze(-1)


def prompt_parameters(tokens: int, hidden: int, encoder: str) -> int:
    """Trainable parameters of a PromptSpell (for the memory plan, without building one: THUDM's LSTM is as
    wide as the model, 0.7 G parameters at hidden 4096)."""
    h = hidden
    count = tokens * h
    if encoder == "lstm":
        count += 2 * (4 * h * (h + h) + 8 * h) + 2 * (4 * h * (2 * h + h) + 8 * h)  # two bidirectional layers
        count += (2 * h * h + h) + (h * h + h)
    elif encoder == "mlp":
        count += 2 * (h * h + h)
    return count


def builder_prompt(config: Optional[PromptConfig]) -> dict:
    """MultipleChoiceBuilder's prompt arguments for rows scored with prompt `config` (None: no prompt)."""
    if config is None:
        return {}
    return {"prompt_tokens": config.num_prompt_tokens, "prompt_placement": config.prompt_placement}


def has_prompt(directory: Optional[str]) -> bool:
    return bool(directory) and os.path.isfile(os.path.join(directory, PROMPT_CONFIG))


def checked_prompt_config(prompt_path: str, model_config, base_path: Optional[str] = None, force: bool = False) -> PromptConfig:
    """The PromptConfig saved in `prompt_path`, refused (AdapterError) as `load_prompt` says."""
    if not os.path.isdir(prompt_path):
        raise AdapterError(f"{prompt_path}: no such prompt directory")
    for required in (PROMPT_CONFIG, PROMPT_WEIGHTS):
        if not os.path.isfile(os.path.join(prompt_path, required)):
            raise AdapterError(f"{prompt_path}: no {required} (expected a P-tuning prompt, as finetune_cloze.py "
                               "--ptuning writes)")
    with open(os.path.join(prompt_path, PROMPT_CONFIG), encoding="utf-8") as f:
        config = PromptConfig(**json.load(f))
    if config.hidden_size != model_config.hidden_size:
        raise AdapterError(f"prompt {prompt_path} was trained on a GLM of hidden size {config.hidden_size}, "
                           f"this base has {model_config.hidden_size}")
    if config.frozen_backbone:
        check_recorded_base(prompt_path, base_path, model_config, force, kind="prompt")
    elif base_path is not None and os.path.abspath(base_path) != os.path.abspath(prompt_path) and not force:
        raise AdapterError(f"prompt {prompt_path} was trained with its whole model (no --freeze_backbone): load "
                           f"that directory as the model (--model_name_or_path {prompt_path}), not {base_path}")
    return config


def load_prompt(model, prompt_path: str, base_path: Optional[str] = None, force: bool = False) -> PromptTunedModel:
    """`model` (a GLMForMultipleChoice) with the P-tuning prompt saved in `prompt_path`, refused (AdapterError)
    when a file is missing, its shapes do not fit, or (a prompt trained on a frozen base) the recorded base is
    not `base_path` (unless `force`)."""
    config = checked_prompt_config(prompt_path, model.config, base_path, force)
    tuned = PromptTunedModel(model, config)
    tuned.spell.set_state_dict(paddle.load(os.path.join(prompt_path, PROMPT_WEIGHTS)))
    tuned.eval()
    return tuned

"""GLM in Paddle: embeddings -> attention -> MLP -> block -> stack -> LM head -> loss.

Parameter names equal PaddleNLP's `GLMForConditionalGeneration`, so its `model_state.pdparams` load
unchanged. Differences from PaddleNLP, all deliberate:
  * the 1-D `sep` attention mask works (PaddleNLP tests `attention_mask.dim == 1`, a method against an int);
  * the decoding cache holds each layer's keys and values, so a step projects the new token only
    (PaddleNLP keeps hidden states and re-projects the whole memory every step);
  * recompute passes the attention mask and also covers layer 0 when the embeddings are frozen;
  * label smoothing is read from the config and applied;
  * with labels, the LM head runs only where `loss_mask` is non-zero (it is the largest matmul of a
    small model: vocab 50048 x hidden per position).
"""

import math
from typing import List, Optional

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute
from paddlenlp.transformers import PretrainedModel, register_base_model
from paddlenlp.transformers.glm.configuration import (
    GLM_PRETRAINED_INIT_CONFIGURATION,
    GLM_PRETRAINED_RESOURCE_FILES_MAP,
)
from paddlenlp.transformers.model_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithCrossAttentions,
    MultipleChoiceModelOutput,
)
from paddlenlp.utils.initializer import normal_, ones_, zeros_

from .configuration import GLMConfig
from .decoding_cache import MASKED_SCORE, LayerCache, StepCache, StepMask

__all__ = ["GLMModel", "GLMPretrainedModel", "GLMForConditionalGeneration", "GLMForMultipleChoice", "attention_bias",
           "prefixed_attention_mask"]

class Dropout(nn.Dropout):
    """nn.Dropout that returns its input untouched when not training: Paddle's launches a copy kernel in eval
    mode, four per layer of every decoding step."""

    def forward(self, x):
        return super().forward(x) if self.training else x


def attention_bias(attention_mask, batch_size: int, query_length: int, memory_length: int = 0):
    """The one place that knows GLM's masks. Returns a float32 additive bias [B|1, 1, q, M+q].

    attention_mask:
      None            -> sep = 0 everywhere: plain causal attention;
      int [B] or [1]  -> `sep` per row: query i (absolute index M+i) sees key j iff j < sep or j <= M+i,
                         i.e. the source before sep is bidirectional and the target is causal;
      0/1 or bool [B, 1, q, M+q] -> 1 where attending is allowed (can also hide padding);
      StepMask        -> its `layer_bias()`, for one token per row over a StepCache (glm/decoding_cache.py).
    """
    if isinstance(attention_mask, StepMask):
        return attention_mask.layer_bias()
    key_length = memory_length + query_length
    if attention_mask is None:
        attention_mask = paddle.zeros([batch_size], dtype="int64")
    if attention_mask.ndim == 1:
        keys = paddle.arange(key_length, dtype="int64").reshape([1, 1, key_length])
        queries = paddle.arange(memory_length, key_length, dtype="int64").reshape([1, query_length, 1])
        sep = attention_mask.astype("int64").reshape([-1, 1, 1])
        allowed = paddle.logical_or(keys < sep, keys <= queries).unsqueeze(1)  # [B, 1, q, M+q]
    elif attention_mask.ndim == 4:
        if attention_mask.shape[-2:] != [query_length, key_length]:
            raise ValueError(
                f"4-D attention_mask must end in [query_length, memory+query] = [{query_length}, {key_length}], "
                f"got shape {attention_mask.shape}"
            )
        allowed = attention_mask.astype("bool")
    else:
        raise ValueError(
            f"attention_mask must be 1-D (one sep per row) or 4-D [B, 1, q, M+q]; got shape {attention_mask.shape}"
        )
    return (1.0 - allowed.astype("float32")) * MASKED_SCORE


def prefixed_attention_mask(attention_mask, prefix_length: int):
    """`attention_mask` (any form `attention_bias` takes but a StepMask) over `prefix_length` more keys in front,
    which every query sees (a P-tuning v2 prefix, glm/prefix.py): a `sep` moves past them; a 4-D mask gains
    columns of ones; None (causal) sees every earlier key, the prefix included, as it is."""
    if attention_mask is None:
        return None
    if attention_mask.ndim == 1:
        return attention_mask + prefix_length
    ones = paddle.ones(attention_mask.shape[:-1] + [prefix_length], dtype=attention_mask.dtype)
    return paddle.concat([ones, attention_mask], axis=-1)


def _linear(layer, x, packed):
    return layer(x) if packed is None else packed.linear(layer, x)


class GLMAttention(nn.Layer):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.attention_scale = config.attention_scale
        self.use_flash_attention = config.use_flash_attention
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = Dropout(config.attention_dropout_prob)
        self.output_dropout = Dropout(config.output_dropout_prob)

    def forward(self, hidden_states, bias, cache: Optional[LayerCache] = None, use_cache: bool = False, packed=None):
        if isinstance(cache, StepCache):  # a decoding step: the cache attends (glm/decoding_cache.py)
            context = cache.attend(self, _linear(self.query_key_value, hidden_states, packed), bias)
            return self.output_dropout(_linear(self.dense, context, packed)), cache
        batch_size, query_length = hidden_states.shape[:2]
        # The fused projection lays out [q | k | v] along the last axis, each [heads * head_dim]. Split
        # first: its backward is a concat, where slicing one 5-D tensor scatters into zeros (2x slower).
        query, key, value = [
            part.reshape([batch_size, query_length, self.num_heads, self.head_dim]).transpose([0, 2, 1, 3])
            for part in paddle.split(_linear(self.query_key_value, hidden_states, packed), 3, axis=-1)
        ]  # each [B, heads, q, head_dim]
        if cache is not None:
            key = paddle.concat([cache[0], key], axis=2)  # [B, heads, M+q, head_dim]
            value = paddle.concat([cache[1], value], axis=2)
        new_cache = (key, value) if use_cache else None

        if self.use_flash_attention:
            context = self._fused_attention(query, key, value, bias)
        else:
            context = self._attention(query, key, value, bias)
        context = context.transpose([0, 2, 1, 3]).reshape([batch_size, query_length, -1])  # [B, q, hidden]
        return self.output_dropout(_linear(self.dense, context, packed)), new_cache

    def _attention(self, query, key, value, bias):
        # THUDM's attention_scale divides the scores before the (half precision) matmul and multiplies
        # them back in float32: same softmax, no fp16 overflow. It is 1.0 in every released config.
        query = query * (1.0 / (math.sqrt(self.head_dim) * self.attention_scale))
        scores = paddle.matmul(query, key, transpose_y=True)  # [B, heads, q, M+q]
        scores = scores.astype("float32")
        if self.attention_scale != 1.0:
            scores = scores * self.attention_scale
        probs = F.softmax(scores + bias, axis=-1).astype(value.dtype)
        probs = self.attention_dropout(probs)
        return paddle.matmul(probs, value)  # [B, heads, q, head_dim]

    def decoding_attention(self, qkv, bias, cache):
        """`_attention` for one new token per row over a DecodingCache: the same scores, one softmax over the
        keys the row sees. qkv [R, 1, 3 * hidden] (the projection), R = sources x beams; bias [B, 1, beams,
        keys]. Few ops, each over all rows: at one token per row a step is mostly dispatch, not arithmetic."""
        rows, beams = qkv.shape[0], cache.beams
        # A source's beams as the rows of one matrix: [3, B, heads, beams, head_dim] for q, k, v.
        qkv = qkv.reshape([rows // beams, beams, 3, self.num_heads, self.head_dim])
        query, key, value = paddle.unbind(qkv.transpose([2, 0, 3, 1, 4]), axis=0)
        cache.write(key, value)
        query = query * (1.0 / (math.sqrt(self.head_dim) * self.attention_scale))
        scores = paddle.matmul(query, cache.keys, transpose_y=True)  # [B, heads, beams, keys]
        scores = _as_float32(scores)
        if self.attention_scale != 1.0:
            scores = scores * self.attention_scale
        probs = F.softmax(scores + bias, axis=-1)  # eval mode: no dropout
        if probs.dtype != cache.values.dtype:
            probs = probs.astype(cache.values.dtype)
        context = paddle.matmul(probs, cache.values)  # [B, heads, beams, head_dim]
        return context.transpose([0, 2, 1, 3]).reshape([rows, 1, -1])  # [R, 1, hidden]

    def _fused_attention(self, query, key, value, bias):
        # scaled_dot_product_attention takes [B, seq, heads, head_dim] and a mask in the compute dtype.
        if self.attention_scale != 1.0:
            raise ValueError("use_flash_attention supports attention_scale == 1.0 only")
        mask = (bias / MASKED_SCORE * _fused_mask_value(query.dtype)).astype(query.dtype)
        context = F.scaled_dot_product_attention(
            query.transpose([0, 2, 1, 3]),
            key.transpose([0, 2, 1, 3]),
            value.transpose([0, 2, 1, 3]),
            attn_mask=mask,
            dropout_p=self.attention_dropout.p,
            training=self.training,
        )
        return context.transpose([0, 2, 1, 3])


def _as_float32(tensor):
    # A cast is one more kernel launch even when there is nothing to cast (float32 on CPU).
    return tensor if tensor.dtype == paddle.float32 else tensor.astype("float32")


def _fused_mask_value(dtype):
    # Half the most negative finite value: adding a score to it can never overflow to -inf.
    return paddle.finfo(dtype).min / 2 if dtype != paddle.float32 else MASKED_SCORE


class GLMMLP(nn.Layer):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)
        self.dropout = Dropout(config.output_dropout_prob)

    def forward(self, hidden_states, packed=None):
        # GLM trains with the tanh-approximate GELU (THUDM's code, PaddleNLP); the HF port's exact GELU differs.
        inner = F.gelu(_linear(self.dense_h_to_4h, hidden_states, packed), approximate=True)
        return self.dropout(_linear(self.dense_4h_to_h, inner, packed))


class GLMBlock(nn.Layer):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layernorm_epsilon)
        self.attention = GLMAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layernorm_epsilon)
        self.mlp = GLMMLP(config)

    def forward(self, hidden_states, bias, cache: Optional[LayerCache] = None, use_cache: bool = False, packed=None):
        attention_output, new_cache = self.attention(self.input_layernorm(hidden_states), bias, cache, use_cache, packed)
        hidden_states = hidden_states + attention_output
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), packed)
        return hidden_states, new_cache


class GLMStack(nn.Layer):
    """Position + block-position embeddings, the blocks, the final LayerNorm."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.block_position_encoding = config.block_position_encoding
        # Rows = max_sequence_length + 1: THUDM's checkpoints have one extra row (positions 0..max).
        rows = config.max_sequence_length + 1 if config.block_position_encoding else config.max_sequence_length
        self.position_embeddings = nn.Embedding(rows, config.hidden_size)
        if config.block_position_encoding:
            self.block_position_embeddings = nn.Embedding(rows, config.hidden_size)
        self.embedding_dropout = Dropout(config.embedding_dropout_prob)
        self.layers = nn.LayerList([GLMBlock(config) for _ in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, epsilon=config.layernorm_epsilon)
        # Switched on by the PaddleNLP Trainer's --recompute (it sets every `enable_recompute` it finds).
        self.enable_recompute = False

    def forward(self, word_embeddings, position_ids, bias, cache: Optional[List[LayerCache]] = None, use_cache=False,
                packed=None):
        if self.block_position_encoding:
            hidden_states = (
                word_embeddings
                + self.position_embeddings(position_ids[:, 0])
                + self.block_position_embeddings(position_ids[:, 1])
            )
        else:
            hidden_states = word_embeddings + self.position_embeddings(position_ids)
        hidden_states = self.embedding_dropout(hidden_states)

        new_caches = [] if use_cache else None
        for index, layer in enumerate(self.layers):
            layer_cache = cache[index] if cache is not None else None
            if self.enable_recompute and self.training and not use_cache:
                # Non-reentrant recompute needs no input gradient, so layer 0 is recomputed too when the
                # embeddings are frozen (LoRA); the mask and the layer's memory go in with the hidden states.
                hidden_states, _ = recompute(layer, hidden_states, bias, layer_cache, use_reentrant=False)
            else:
                hidden_states, layer_cache = layer(hidden_states, bias, layer_cache, use_cache, packed)
            if use_cache:
                new_caches.append(layer_cache)
        return self.final_layernorm(hidden_states), new_caches


class GLMPretrainedModel(PretrainedModel):
    base_model_prefix = "glm"
    config_class = GLMConfig
    resource_files_names = {"model_state": "model_state.pdparams"}
    # PaddleNLP's download addresses, so `from_pretrained("THUDM/glm-large-chinese")` fetches its weights.
    pretrained_init_configuration = GLM_PRETRAINED_INIT_CONFIGURATION
    pretrained_resource_files_map = GLM_PRETRAINED_RESOURCE_FILES_MAP

    def _init_weights(self, layer):
        # THUDM's init: normal(0, initializer_range) for every matrix and embedding, zero bias, unit LayerNorm.
        if isinstance(layer, (nn.Linear, nn.Embedding)):
            normal_(layer.weight, mean=0.0, std=self.config.initializer_range)
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm):
            ones_(layer.weight)
            zeros_(layer.bias)


def _check_runs_here(tensor):
    # Paddle's CPU kernels have no float16/bfloat16 matmul, LayerNorm or softmax: say so instead of
    # failing deep inside a kernel lookup.
    if tensor.dtype in (paddle.float16, paddle.bfloat16) and tensor.place.is_cpu_place():
        raise RuntimeError(
            f"GLM in {str(tensor.dtype).replace('paddle.', '')} needs a GPU: Paddle has no half-precision "
            "matmul/LayerNorm/softmax kernels on CPU. Run in float32 on CPU (drop --fp16/--bf16 or --dtype)."
        )


def _memory_length(layer_cache) -> int:
    if isinstance(layer_cache, StepCache):
        return layer_cache.memory_length
    return layer_cache[0].shape[2]


@register_base_model
class GLMModel(GLMPretrainedModel):
    """GLM without the LM head: returns the final hidden states [B, L, hidden] and, with use_cache, the
    per-layer (keys, values) of memory + this call."""

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer = GLMStack(config)

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        cache: Optional[List[LayerCache]] = None,
        use_cache: bool = False,
        return_dict: Optional[bool] = None,
        inputs_embeds=None,
        packed=None,
    ):
        """`inputs_embeds` [B, L, hidden]: the word embeddings to use instead of looking `input_ids` up (THUDM's
        P-tuning puts its prompt there, glm/ptuning.py). `packed`: the linear layers' weights packed for MKL
        (glm/packed_gemm.PackedLinears, a decoding ModelRunner's), used for products of few rows."""
        batch_size, query_length = input_ids.shape
        memory_length = _memory_length(cache[0]) if cache else 0
        if position_ids is None:
            positions = paddle.arange(memory_length, memory_length + query_length, dtype="int64")
            if self.config.block_position_encoding:
                positions = paddle.stack([positions, paddle.zeros_like(positions)])  # [2, L]
            position_ids = positions.unsqueeze(0).expand([batch_size] + positions.shape)
        word_embeddings = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [B, L, hidden]
        _check_runs_here(word_embeddings)
        bias = attention_bias(attention_mask, batch_size, query_length, memory_length)
        hidden_states, new_cache = self.transformer(word_embeddings, position_ids, bias, cache, use_cache, packed)
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if not return_dict:
            return (hidden_states, new_cache)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=new_cache)


class GLMForConditionalGeneration(GLMPretrainedModel):
    """GLM with its LM head (tied to the word embeddings) and the masked, optionally smoothed, loss."""

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        self.glm = GLMModel(config)

    def lm_logits(self, hidden_states, packed=None):
        """hidden_states . E^T (the head is tied to the word embeddings); `packed`: E^T packed by the caller
        (glm/packed_gemm.py, a decoding ModelRunner's), used instead of the matmul."""
        if packed is not None:
            return packed.matmul(hidden_states)
        return paddle.matmul(hidden_states, self.glm.word_embeddings.weight, transpose_y=True)

    def forward(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        labels=None,
        loss_mask=None,
        cache: Optional[List[LayerCache]] = None,
        use_cache: bool = False,
        return_dict: Optional[bool] = None,
        return_logits: Optional[bool] = None,
    ):
        """Returns (loss, logits, cache) as a tuple or `CausalLMOutputWithCrossAttentions`.

        labels [B, L] and loss_mask [B, L] (float or int; None = every label >= 0 counts): the loss is the
        token cross-entropy weighted by loss_mask and divided by its sum. By default logits are computed
        only when there are no labels (`return_logits=True` forces them).
        """
        hidden_states, new_cache = self.glm(
            input_ids, position_ids, attention_mask, cache=cache, use_cache=use_cache, return_dict=False
        )
        if return_logits is None:
            return_logits = labels is None
        logits = self.lm_logits(hidden_states) if return_logits else None
        loss = None
        if labels is not None:
            loss = self.loss(hidden_states, labels, loss_mask)

        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if not return_dict:
            output = (logits, new_cache)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, past_key_values=new_cache)

    def loss(self, hidden_states, labels, loss_mask=None):
        """Weighted token cross-entropy with THUDM's label smoothing, on the weighted positions only."""
        labels = labels.reshape([-1])
        if loss_mask is None:
            weights = (labels >= 0).astype("float32")
        else:
            weights = loss_mask.reshape([-1]).astype("float32")
        positions = paddle.nonzero(weights).reshape([-1])
        hidden = paddle.gather(hidden_states.reshape([-1, hidden_states.shape[-1]]), positions)  # [N, hidden]
        logits = self.lm_logits(hidden).astype("float32")  # [N, vocab]
        token_labels = paddle.gather(labels, positions).unsqueeze(-1)
        # cross_entropy and logsumexp, not log_softmax: Paddle's CPU log_softmax kernel is ~100x slower
        # (3.5 s for 500 x 8192 on 2 cores). mean_vocab(-log_softmax) = logsumexp - mean(logits).
        token_loss = F.cross_entropy(logits, token_labels, reduction="none").squeeze(-1)
        epsilon = self.config.label_smoothing
        if epsilon > 0:
            smooth_loss = paddle.logsumexp(logits, axis=-1) - logits.mean(axis=-1)
            token_loss = (1.0 - epsilon) * token_loss + epsilon * smooth_loss
        weights = paddle.gather(weights, positions)
        return (token_loss * weights).sum() / weights.sum()


def padded_choices(choice_ids, choice_indices):
    """Per-choice token ids and their row positions as int64 tensors [B, C, n], padded with index -1.

    Accepts PaddleNLP's form (per example, a list of per-choice 1-D arrays/tensors/lists; examples may
    differ in their number of choices and choices in their length) or tensors already padded this way."""
    if isinstance(choice_indices, paddle.Tensor) and choice_indices.ndim == 3:
        return choice_ids.astype("int64"), choice_indices.astype("int64")

    def as_list(values):
        return values.tolist() if hasattr(values, "tolist") else list(values)

    ids = [[as_list(c) for c in example] for example in choice_ids]
    indices = [[as_list(c) for c in example] for example in choice_indices]
    num_choices = max(len(example) for example in indices)
    longest = max(len(c) for example in indices for c in example)
    padded_ids, padded_indices = [], []
    for b, (example_ids, example_indices) in enumerate(zip(ids, indices)):
        for c, (tokens, positions) in enumerate(zip(example_ids, example_indices)):
            if len(tokens) != len(positions):
                raise ValueError(f"example {b} choice {c}: {len(tokens)} choice ids but {len(positions)} indices")
        missing = [[]] * (num_choices - len(example_indices))
        padded_ids.append([c + [0] * (longest - len(c)) for c in example_ids + missing])
        padded_indices.append([c + [-1] * (longest - len(c)) for c in example_indices + missing])
    return paddle.to_tensor(padded_ids, dtype="int64"), paddle.to_tensor(padded_indices, dtype="int64")


class GLMForMultipleChoice(GLMPretrainedModel):
    """GLM scoring choices for a blank: PaddleNLP's class name, parameter names and call signature.

    A choice's score is the sum of log p(token) over its tokens, read at `choice_indices` (where each of
    its tokens is predicted, e.g. a packed `<|startofpiece|> choice[:-1]` block; see
    glm.inputs.MultipleChoiceBuilder). Unlike PaddleNLP it runs the LM head only at those positions and
    takes the log-softmax as -cross_entropy (Paddle's CPU log_softmax is ~100x slower), and it does not
    return the full vocabulary logits. Examples with fewer choices than the batch's widest get -inf
    scores for the missing ones (they never win and add nothing to the loss).
    """

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        self.glm = GLMModel(config)

    def forward(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        choice_ids=None,
        choice_indices=None,
        labels=None,
        cache: Optional[List[LayerCache]] = None,
        return_dict: Optional[bool] = None,
        inputs_embeds=None,
    ):
        """Returns (loss, scores [B, C]) as a tuple, or `MultipleChoiceModelOutput`; loss only with labels.
        `cache`: per-layer memory every position attends to (a P-tuning v2 prefix, glm/prefix.py);
        `inputs_embeds`: word embeddings to use instead of the ids' (a P-tuning prompt, glm/ptuning.py)."""
        hidden_states, _ = self.glm(input_ids, position_ids, attention_mask, cache=cache, return_dict=False,
                                    inputs_embeds=inputs_embeds)
        scores = self.choice_scores(hidden_states, *padded_choices(choice_ids, choice_indices))
        loss = F.cross_entropy(scores, labels.reshape([-1, 1]).astype("int64")) if labels is not None else None
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if not return_dict:
            return (loss, scores) if loss is not None else (scores,)
        return MultipleChoiceModelOutput(loss=loss, logits=scores)

    def choice_scores(self, hidden_states, choice_ids, choice_indices):
        batch_size, length, hidden_size = hidden_states.shape
        num_choices, longest = choice_indices.shape[1], choice_indices.shape[2]
        valid = (choice_indices >= 0).reshape([-1])
        tokens = paddle.nonzero(valid).reshape([-1])  # flat [B*C*n] indices of real choice tokens
        example = tokens // (num_choices * longest)
        rows = example * length + paddle.gather(choice_indices.reshape([-1]), tokens)
        hidden = paddle.gather(hidden_states.reshape([-1, hidden_size]), rows)  # [N, hidden]
        logits = paddle.matmul(hidden, self.glm.word_embeddings.weight, transpose_y=True).astype("float32")
        targets = paddle.gather(choice_ids.reshape([-1]), tokens).unsqueeze(-1)
        token_log_probs = -F.cross_entropy(logits, targets, reduction="none").squeeze(-1)  # [N]
        # Sum each choice's tokens: a [B*C, N] 0/1 matrix times the token log-probabilities.
        owner = F.one_hot(tokens // longest, batch_size * num_choices).astype("float32")  # [N, B*C]
        scores = paddle.matmul(owner, token_log_probs.unsqueeze(-1), transpose_x=True).reshape([batch_size, num_choices])
        present = (choice_indices >= 0).any(axis=-1)
        return paddle.where(present, scores, paddle.full_like(scores, float("-inf")))

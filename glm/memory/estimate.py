"""How much memory a training or decoding run of GLM needs, per device, part by part, before it allocates any.

The accounting follows what this toolkit's model and PaddleNLP's Trainer keep alive (glm/modeling.py), not a
rule of thumb; every number below is a count of tensors, checked against Paddle's allocator statistics on
CPU in float32 (bench/memory.py prints the table, tests/test_memory.py checks a few shapes).

Model states (per trainable parameter): the weight, its gradient (kept between steps) and AdamW's two
moments in float32; under fp16/bf16 O2 the weight and gradient are half precision and AdamW keeps a float32
master weight (Paddle's multi_precision path: 2 + 2 + 4 + 4 + 4 = 16 bytes, as in float32: O2 saves
activations and a frozen base, not optimizer state). A LoRA base is frozen: its weights only. Sharding
over D devices divides the optimizer state (stage 1), then the gradients (stage 2), then the weights
(stage 3, which gathers one layer's weights at a time).

Activations of one micro-batch of B rows of L tokens (e = B·L·hidden elements, A = B·heads·L² attention
scores), saved for the backward pass by each layer: 16 e in the compute dtype (the LayerNorm outputs, q, k,
v and the scaled query, the attention context before and after its transpose, the residual sums, the
MLP's 4-wide input and GELU output, the layer output), the softmax A in float32, and with dropout its
mask (1 byte each) and the dropped probabilities, plus two 1-byte masks of e. With --recompute a layer
keeps only its input (e), and one layer at a time holds the rest while it is recomputed. Outside the
layers: the embedding dropout, the final LayerNorm, the additive mask [B, 1, L, L] in float32, and the
LM head on the S scored positions only: softmax [S, vocab] in float32 kept by the cross-entropy (and the
logits too under label smoothing), twice that for a moment while it is computed. The backward pass adds,
at the LM head, a [vocab, hidden] temporary for the tied embeddings' gradient (when they train).

Decoding (predict, the server, a finetune's evaluation) keeps per layer the keys and values of every
source's memory plus beams x tgt_length generated slots (glm.decoding_cache), the [rows, vocab] scores of a
step a few times over (the NumPy search), and on CPU the weights packed for MKL (a copy of the embeddings
and of every layer's plain Linear weights).

A process also holds what it needs before any model exists (Python, Paddle, PaddleNLP: `runtime`); on a GPU
the CUDA context and the caching allocator's slack.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .shapes import ModelShape

__all__ = ["TrainingLoad", "DecodingLoad", "Estimate", "estimate_training", "estimate_decoding", "MIB", "GIB",
           "CPU_RUNTIME_BYTES", "GPU_RUNTIME_BYTES"]  # fmt: skip

MIB, GIB = 2**20, 2**30
# A CPU process with Python, Paddle and PaddleNLP imported, before any model (measured: 0.51 GiB for
# finetune_generation.py on Paddle 3.3.1; an entry script uses its own measured figure instead).
CPU_RUNTIME_BYTES = int(0.55 * GIB)
# A GPU process: the CUDA context with cuBLAS/cuDNN workspaces (0.5-0.9 GiB by card and driver).
GPU_RUNTIME_BYTES = int(0.8 * GIB)
# Paddle's GPU allocator reserves more than it hands out; PyTorch and Paddle users see 5-10 % more.
GPU_ALLOCATOR_SLACK = 0.08
# With glm.cli.process.return_freed_memory, a CPU process's resident peak is its tensors' plus 2-3 %.
CPU_ALLOCATOR_SLACK = 0.03
DATA_PARALLEL_BUFFERS = 2 * 25 * MIB  # gradient fusion buckets in flight (DataParallel's comm_buffer_size)


@dataclass
class TrainingLoad:
    """One training run's shape per device: a micro-batch of `batch` rows of `length` tokens, `scored` of
    them in the loss (per row), on `devices` devices."""

    shape: ModelShape
    batch: int
    length: int
    scored: int
    recompute: bool = False
    half: bool = False  # fp16/bf16 O2
    lora_rank: int = 0  # 0: every weight trains
    lora_targets: Sequence[str] = ()
    adapter_parameters: int = 0  # a prefix's or a frozen-backbone prompt's (glm/prefix.py, glm/ptuning.py): only they train
    devices: int = 1
    sharding_stage: int = 0  # 0: data parallel without sharding
    accumulation: int = 1  # gradient accumulation steps
    dropout: bool = True
    label_smoothing: bool = False
    gpu: bool = False


@dataclass
class DecodingLoad:
    """Decoding `batch` sources of `src_length` tokens, `rows_per_source` rows each (beams, or sampled
    answers) for up to `tgt_length` new tokens, in `dtype_bytes` per element."""

    shape: ModelShape
    batch: int
    src_length: int
    tgt_length: int
    rows_per_source: int = 1
    half: bool = False
    gpu: bool = False
    lora_rank: int = 0
    lora_targets: Sequence[str] = ()


@dataclass
class Estimate:
    """Bytes per device by part; `peak` is what they add up to at the worst moment (parts that never coexist
    counted once: see `moment`)."""

    parts: Dict[str, int]
    peak: int
    moment: str  # when the peak happens
    notes: List[str] = field(default_factory=list)

    def mib(self) -> float:
        return self.peak / MIB

    def gib(self) -> float:
        return self.peak / GIB

    def to_json(self) -> dict:
        return {"per_device_gib": round(self.gib(), 3), "peak_mib": round(self.mib()), "moment": self.moment,
                "parts_mib": {name: round(value / MIB, 1) for name, value in self.parts.items()}, "notes": self.notes}


def _trainable(shape: ModelShape, lora_rank: int, lora_targets: Sequence[str], adapter_parameters: int = 0) -> int:
    if adapter_parameters:
        return adapter_parameters
    if not lora_rank:
        return shape.parameters()
    return shape.num_layers * lora_rank * shape.linear_parameters(lora_targets)


def model_states(load: TrainingLoad) -> Dict[str, int]:
    """Weights, gradients and AdamW state per device (sharding divides them)."""
    shape, d = load.shape, max(1, load.devices)
    trainable = _trainable(shape, load.lora_rank, load.lora_targets, load.adapter_parameters)
    weight_bytes = 2 if load.half else 4
    adapter = load.lora_rank or load.adapter_parameters  # parameters beside the base's, not among them
    weights = shape.parameters() * weight_bytes + (trainable * weight_bytes if adapter else 0)
    gradients = trainable * weight_bytes
    optimizer = trainable * (8 + (4 if load.half else 0))  # AdamW's moments (and master weights) in float32
    stage = load.sharding_stage if d > 1 else 0
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer}
    if stage >= 1:
        parts["optimizer"] = optimizer // d
    if stage >= 2:
        parts["gradients"] = gradients // d
    if stage >= 3:
        layer = 12 * shape.hidden_size**2 * weight_bytes
        parts["weights"] = weights // d + 2 * layer  # one layer gathered, the next prefetched
    if d > 1 and stage == 0:
        parts["data_parallel"] = DATA_PARALLEL_BUFFERS
    return parts


def estimate_training(load: TrainingLoad, runtime: Optional[int] = None) -> Estimate:
    """The peak of a training step (the second and later: AdamW's state then exists). GLMTrainer releases
    the gradients after each optimizer step, so a step's first forward pass runs without them; with
    gradient accumulation the later micro-batches run with them."""
    shape = load.shape
    b = 2 if load.half else 4  # activation bytes
    e = load.batch * load.length * shape.hidden_size
    a = load.batch * shape.num_attention_heads * load.length**2
    s = load.batch * load.scored  # scored positions
    v, h = shape.vocab_size, shape.hidden_size

    attention = 4 * a + ((1 + b) * a if load.dropout else (2 * a if load.half else 0))
    layer = 16 * e * b + (2 * e if load.dropout else 0) + attention  # what one layer keeps for backward
    layer_transient = 6 * e * b  # the last layer's first backward temporaries (GELU's and the MLP's input grads)
    outside = 2 * e * b + (e if load.dropout else 0) + load.batch * load.length**2 * 4 + s * h * b
    logits = s * v * 4 * (2 if load.label_smoothing else 1)
    head_gradient = v * h * (2 if load.half else 4) if not (load.lora_rank or load.adapter_parameters) else 0  # the tied embeddings' at the LM head
    if load.recompute:
        kept = shape.num_layers * e * b
        forward = kept + outside + max(logits + s * v * 4, logits + layer)
        backward = kept + outside + logits + max(s * h * b, layer + layer_transient)
    else:
        kept = shape.num_layers * layer
        forward = kept + outside + logits + s * v * 4
        backward = kept + outside + logits + max(s * h * b, layer_transient)

    states = model_states(load)
    gradients = states.pop("gradients")
    held = gradients if load.accumulation > 1 else 0  # gradients alive during the pass
    moments = {
        "forward, at the LM head": (held, forward),
        "backward, at the LM head or the last layer": (max(held, head_gradient), backward),
        # The first layer's backward: every other gradient exists, its own activations (recomputed) too.
        "backward, at the first layer": (gradients, layer + layer_transient),
    }
    moment, (grads_then, activations) = max(moments.items(), key=lambda item: sum(item[1]))
    parts = dict(states, gradients=grads_then, activations=activations)
    notes = [f"micro-batch {load.batch} x {load.length} tokens, {load.scored} scored per row"]
    return _finish(parts, moment, notes, load.gpu, runtime)


def _finish(parts: Dict[str, int], moment: str, notes: List[str], gpu: bool, runtime: Optional[int]) -> Estimate:
    """The parts with the process's own memory and the allocator's slack added, and their sum."""
    tensors = sum(parts.values())
    parts["allocator_slack"] = int((GPU_ALLOCATOR_SLACK if gpu else CPU_ALLOCATOR_SLACK) * tensors)
    parts["runtime"] = _runtime(gpu, runtime)
    return Estimate(parts, sum(parts.values()), moment, notes)


def estimate_decoding(load: DecodingLoad, runtime: Optional[int] = None, states: Optional[Dict[str, int]] = None
                      ) -> Estimate:
    """The peak of decoding one batch: encoding the sources, or a step near the end (`states`: what a training
    run keeps alive meanwhile, for a finetune's evaluation)."""
    shape = load.shape
    b = 2 if load.half else 4
    h, v, n = shape.hidden_size, shape.vocab_size, shape.num_layers
    rows = load.batch * load.rows_per_source
    memory = load.src_length
    keys = memory + load.rows_per_source * load.tgt_length  # key positions a source's DecodingCache holds
    # The encoder's keys and values stay referenced while the DecodingCache holds them copied with the slots.
    cache = n * 2 * load.batch * (memory + keys) * h * b + rows * keys * 4  # + the DecodingMask
    e = load.batch * memory * h
    encode = n * 2 * e * b + 8 * e * b + 2 * load.batch * shape.num_attention_heads * memory**2 * 4
    step = 5 * rows * v * 4 + 2 * rows * shape.num_attention_heads * keys * 4  # logits and the NumPy search
    parts = dict(states) if states is not None else {
        "weights": shape.parameters() * b + (n * load.lora_rank * shape.linear_parameters(load.lora_targets) * b)}
    if not load.gpu:  # MKL's packed copies of the embeddings and of the layers' plain (not LoRA) Linear weights
        adapted = shape.linear_weights(load.lora_targets) if load.lora_rank else 0
        parts["packed_weights"] = (v * h + n * (12 * h * h - adapted)) * 4
    decoding, moment = (cache + step, "decoding, the last step") if cache + step >= encode else (
        encode, "decoding, encoding the sources")
    parts["decoding"] = decoding
    notes = [f"{load.batch} sources of {load.src_length} tokens, {load.rows_per_source} rows each, up to "
             f"{load.tgt_length} new tokens"]
    return _finish(parts, moment, notes, load.gpu, runtime)


def _runtime(gpu: bool, runtime: Optional[int]) -> int:
    if runtime is not None:
        return runtime
    return GPU_RUNTIME_BYTES if gpu else CPU_RUNTIME_BYTES


def larger(*estimates: Estimate) -> Estimate:
    """The estimate of the worst of several phases of one run (training, then evaluation)."""
    return max(estimates, key=lambda estimate: estimate.peak)

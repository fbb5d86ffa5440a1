"""What the benchmarks run, and PaddleNLP's side of it, importing neither `glm` nor anything that does.

bench/shipped.py runs PaddleNLP from here in a process that never imports `glm`, so it gets what a
PaddleNLP user gets (Paddle's own thread count, MKL's default kernels); bench/decode.py and
bench/train_step.py use the same pieces next to our engine in one process.
"""

from types import SimpleNamespace

import numpy as np
import paddle
from paddlenlp.transformers import GLMConfig as PaddleNLPGLMConfig
from paddlenlp.transformers import GLMForConditionalGeneration as PaddleNLPGLM
from paddlenlp.transformers.glm.tokenizer import GLMTokenizerMixin

# The model shapes: a tiny one, and glm-large-chinese's layer and vocabulary sizes over a few layers.
# `eos` is the first of GLM's ten special ids (50000 in the real vocabulary; 566 in our tiny default's).
DECODE_SHAPES = {
    "tiny": dict(num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=576, max_sequence_length=256,
                 eos=566),
    "large": dict(num_layers=2, hidden_size=1024, num_attention_heads=16, vocab_size=50048, max_sequence_length=1024,
                  eos=50000),
}
TRAIN_SHAPES = {
    "tiny": dict(num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=8192, seq=128, batch=8),
    "large": dict(num_layers=2, hidden_size=1024, num_attention_heads=16, vocab_size=50048, seq=512, batch=2),
}


def special_ids(eos):
    """GLM's layout: <|endoftext|> [SEP] [CLS] [MASK] [UNUSED1] [UNUSED2] <|startofpiece|> <|endofpiece|>
    [sMASK] [gMASK], as the fields of glm.tokenization.GLMSpecialIds."""
    return dict(cls=eos + 2, eos=eos, sop=eos + 6, eop=eos + 7, mask=eos + 3, smask=eos + 8, gmask=eos + 9)


def make_sources(ids, count, shortest, longest, seed=0):
    """`count` prompts `[CLS] random ids [gMASK] <|endoftext|>` of lengths spread over [shortest, longest]."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(shortest, longest, count).astype(int)
    return [[ids["cls"]] + rng.integers(0, ids["eos"], n - 3).tolist() + [ids["gmask"], ids["eos"]] for n in lengths]


def paddlenlp_model(shape, banned_ids=(), **overrides):
    """PaddleNLP's GLM in eval mode. For decoding, `banned_ids` (<|endofpiece|> and <|endoftext|>: our engine
    stops on both, so both are banned on both sides) are banned in its per-model logits hook: PaddleNLP's min
    length blocks one id only, and its `logits_processors` argument crashes (get_logits_processor iterates a
    LogitsProcessorList, which is not iterable). Out of place: greedy_search hands the hook the strided view
    `logits[:, -1, :]`, and Paddle 3.3.1's setitem with a list index on a strided view writes outside it (it
    corrupted our model's weights)."""
    model = PaddleNLPGLM(PaddleNLPGLMConfig(**shape, output_predict=True, **overrides))
    model.eval()
    if banned_ids:
        bias = paddle.zeros([shape["vocab_size"]])
        bias[list(banned_ids)] = -1e9

        def ban(logits):
            return logits + bias

        model.adjust_logits_during_generation = ban
    return model


def paddlenlp_inputs(sources, ids, new_tokens):
    """PaddleNLP's own recipe (GLMTokenizerMixin.build_inputs_for_generation) on the tokenizer's right-padded
    batch (<|startofpiece|> appended, position_ids [B, 2, L + max_gen], 4-D 0/1 mask: its 1-D `sep` path never
    runs); the recipe reads only the mask and sop ids from the tokenizer, so no vocabulary file is needed."""
    length = max(len(source) for source in sources)
    input_ids = np.full((len(sources), length), ids["eos"], dtype="int64")
    attention_mask = np.zeros_like(input_ids)
    for row, source in enumerate(sources):
        input_ids[row, : len(source)] = source
        attention_mask[row, : len(source)] = 1
    tokenizer = SimpleNamespace(mask_token_ids=[ids["mask"], ids["smask"], ids["gmask"]], sop_token_id=ids["sop"])
    batch = SimpleNamespace(input_ids=input_ids, attention_mask=attention_mask)
    inputs = GLMTokenizerMixin.build_inputs_for_generation(tokenizer, batch, max_gen_length=new_tokens)
    return {name: paddle.to_tensor(value) for name, value in inputs.items()}


def paddlenlp_greedy(model, ids, sources, new_tokens):
    """A function running PaddleNLP's greedy `generate` for exactly `new_tokens` tokens; returns them per prompt."""
    inputs = paddlenlp_inputs(sources, ids, new_tokens)

    def run():
        output, _ = model.generate(**inputs, decode_strategy="greedy_search", max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, eos_token_id=ids["eop"], pad_token_id=ids["eos"])
        return output.numpy().tolist()

    return run


def sep_mask(sep: np.ndarray, length: int) -> np.ndarray:
    """The 4-D 0/1 mask [B, 1, L, L] PaddleNLP is fed for GLM's 1-D `sep` (its own 1-D path is broken): query i
    sees key j iff j < sep or j <= i."""
    keys = np.arange(length)[None, None, :]
    queries = np.arange(length)[None, :, None]
    return ((keys < np.asarray(sep)[:, None, None]) | (keys <= queries)).astype("float32")[:, None]


def training_batch(batch, seq, vocab_size):
    """A GLM generation example: a bidirectional source then a causal target carrying the loss (source 3/4 of
    the sequence, like src_length 608 / tgt_length 160). Returns (inputs, sep [B], 4-D 0/1 mask): PaddleNLP gets
    the 4-D mask (its 1-D `sep` path never runs), ours the 1-D sep it is fed in training."""
    source_length = seq * 3 // 4
    input_ids = paddle.randint(0, vocab_size, [batch, seq])
    positions = paddle.arange(seq, dtype="int64")
    position_ids = paddle.stack(
        [
            paddle.where(positions < source_length, positions, paddle.full_like(positions, source_length - 2)),
            paddle.clip(positions - source_length + 1, min=0),
        ]
    ).unsqueeze(0).expand([batch, 2, seq])
    sep = paddle.full([batch], source_length, dtype="int64")
    mask_4d = paddle.to_tensor(sep_mask(np.full(batch, source_length), seq))
    loss_mask = (positions >= source_length - 1).astype("float32").unsqueeze(0).expand([batch, seq])
    labels = paddle.randint(0, vocab_size, [batch, seq])
    return dict(input_ids=input_ids, position_ids=position_ids, labels=labels, loss_mask=loss_mask), sep, mask_4d


def training_step(model, inputs):
    """A function running one training step (forward, backward, AdamW step) of `model`; returns the loss."""
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-5, parameters=model.parameters(), weight_decay=0.1)

    def step():
        loss = model(**inputs, return_dict=True).loss
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        return float(loss)

    return step

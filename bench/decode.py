"""Decode tokens/s of our GLM engine (glm/generation.py) and of PaddleNLP's GLM `generate` on the same
weights, prompts and number of new tokens, in the same process; prints tokens/s, the ratio, whether the
greedy tokens of both agree, and what PaddleNLP's beam search does with short prompts.

    python bench/decode.py                          # tiny config and a glm-large-shaped slice (4 layers)
    python bench/decode.py --only large --layers 24 --steps 3

Both sides do the same work: exactly --new-tokens tokens per prompt, prompt encoding included. The stop
ids (<|endofpiece|>, <|endoftext|>) are banned on both sides, and PaddleNLP also gets min_new_tokens =
max_new_tokens. PaddleNLP is fed as its tokenizer's `build_inputs_for_generation` lays inputs out
(right-padded sources, <|startofpiece|> appended, position_ids [B, 2, L + max_gen], 4-D 0/1 mask: its
1-D `sep` path never runs); ours gets the token lists and left-pads them itself.

tokens/s = prompts x new tokens / seconds of one generate call. Beam search returns the best sequence
of each prompt, so its tokens/s counts those returned tokens (prompts x new tokens) although it decodes
beams x as many rows. Then the cost of one decoding step of ours, greedy and beam, split by kind of work
(weight matmuls, attention, cache writes, reorder, NumPy search, host transfers): see StepSplit.
Not a test: figures only.
"""

import argparse
import cProfile
import functools
import os
import pstats
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import glm  # noqa: E402  (sets the CPU thread count before paddle is imported)
import numpy as np  # noqa: E402
import paddle  # noqa: E402
from paddlenlp.transformers import GLMConfig as PaddleNLPGLMConfig  # noqa: E402
from paddlenlp.transformers import GLMForConditionalGeneration as PaddleNLPGLM  # noqa: E402
from paddlenlp.transformers.glm.tokenizer import GLMTokenizerMixin  # noqa: E402

from glm.generation import GenerationConfig, GLMGenerator  # noqa: E402
from glm.modeling import MASKED_SCORE, DecodingCache, GLMAttention  # noqa: E402
from glm.tokenization import GLMSpecialIds  # noqa: E402

# `eos` is the first of GLM's ten special ids (50000 in the real vocabulary; 566 in our tiny default's).
SHAPES = {
    "tiny": dict(num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=576, max_sequence_length=256,
                 eos=566),
    "large": dict(num_layers=4, hidden_size=1024, num_attention_heads=16, vocab_size=50048, max_sequence_length=1024,
                  eos=50000),
}
BEAMS = 5


def special_ids(eos):
    # GLM's layout: <|endoftext|> [SEP] [CLS] [MASK] [UNUSED1] [UNUSED2] <|startofpiece|> <|endofpiece|> [sMASK] [gMASK]
    return GLMSpecialIds(cls=eos + 2, eos=eos, sop=eos + 6, eop=eos + 7, mask=eos + 3, smask=eos + 8, gmask=eos + 9)


def make_sources(ids, count, shortest, longest, seed=0):
    """`count` prompts `[CLS] random ids [gMASK] <|endoftext|>` of lengths spread over [shortest, longest]."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(shortest, longest, count).astype(int)
    return [[ids.cls] + rng.integers(0, ids.eos, n - 3).tolist() + [ids.gmask, ids.eos] for n in lengths]


SPLIT = ("weight matmuls", "attention", "cache writes/copies", "reorder/drop rows", "search (NumPy)",
         "host transfers", "other ops")


class StepSplit:
    """Wall time of a generate call split by kind of work: the functions doing each kind are wrapped with
    timers that count exclusive time (a wrapped call inside another is charged to its own kind). CPU kernels
    run synchronously, so a call's wall time is its work. Unwrapped time is "other ops" (LayerNorm, GELU,
    embeddings, dropout, masks, Paddle's Python dispatch)."""

    def __init__(self):
        self.seconds = dict.fromkeys(SPLIT, 0.0)
        self.stack = []  # [kind, seconds spent in wrapped children]

    def timed(self, kind, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            # paddle.concat is a cache copy only when GLMAttention.forward concatenates the memory itself
            charged = kind(self.stack) if callable(kind) else kind
            self.stack.append([charged, 0.0])
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                _, children = self.stack.pop()
                if charged is not None:
                    self.seconds[charged] += elapsed - children
                    if self.stack:
                        self.stack[-1][1] += elapsed
                elif self.stack:  # a neutral frame: its own time stays with the caller
                    self.stack[-1][1] += children

        return wrapper

    @contextmanager
    def watching(self, model, generator):
        patches = [(layer, "forward", "weight matmuls") for layer in model.sublayers()
                   if isinstance(layer, paddle.nn.Linear)]
        patches += [(model, "lm_logits", "weight matmuls")]
        for layer in model.sublayers():
            if isinstance(layer, GLMAttention):
                patches += [(layer, "_attention", "attention"), (layer, "forward", None)]
                if hasattr(layer, "_decoding_attention"):
                    patches.append((layer, "_decoding_attention", "attention"))
        patches += [(DecodingCache, "write", "cache writes/copies")] if hasattr(DecodingCache, "write") else []
        in_attention_forward = lambda stack: "cache writes/copies" if stack and stack[-1][0] is None else None  # noqa: E731
        patches += [(paddle, "concat", in_attention_forward), (paddle, "index_select", "reorder/drop rows"),
                    (paddle, "to_tensor", "host transfers"), (paddle.Tensor, "numpy", "host transfers")]
        patches += [(generator, name, "search (NumPy)") for name in
                    ("_beam_search", "_sample", "_processed_scores", "_beam_candidates", "_sample_tokens", "_logprobs")
                    if hasattr(generator, name)]
        saved = [(owner, name, vars(owner).get(name, _MISSING)) for owner, name, _ in patches]
        for owner, name, kind in patches:
            setattr(owner, name, self.timed(kind, getattr(owner, name)))
        try:
            yield self
        finally:
            for owner, name, original in reversed(saved):
                if original is _MISSING:  # an instance attribute shadowed the class's method
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)


_MISSING = object()


def step_split(generator, model, sources, strategy, beams, new_tokens):
    """Seconds per decoding step by kind of work: the split of a call making `new_tokens` tokens minus that of
    a call making 1 (prompt encoding, <|startofpiece|> step, set-up), over new_tokens - 1 steps."""
    splits = []
    for tokens in (new_tokens, 1):
        config = GenerationConfig(decode_strategy=strategy, num_beams=beams, tgt_length=tokens)
        split = StepSplit()
        with split.watching(model, generator):
            start = time.perf_counter()
            generator.generate(sources, config)
            total = time.perf_counter() - start
        split.seconds["other ops"] = total - sum(split.seconds.values())
        splits.append(split.seconds)
    return {kind: (splits[0][kind] - splits[1][kind]) / (new_tokens - 1) for kind in SPLIT}


def weight_matmul_seconds(model, row_counts, repeats=5):
    """Median seconds of one step's weight matmuls alone (every Linear, then the LM head) at each row count,
    the counts interleaved: the floor under a step, and how it grows with rows on this CPU."""
    linears = [layer for layer in model.sublayers() if isinstance(layer, paddle.nn.Linear)]
    hidden = model.glm.word_embeddings.weight.shape[1]
    inputs = {rows: ([paddle.randn([rows, 1, layer.weight.shape[0]]) for layer in linears], paddle.randn([rows, hidden]))
              for rows in row_counts}
    seconds = {rows: [] for rows in row_counts}
    with paddle.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for rows, (linear_inputs, head_input) in inputs.items():
                start = time.perf_counter()
                for layer, x in zip(linears, linear_inputs):
                    layer(x)
                model.lm_logits(head_input)
                seconds[rows].append(time.perf_counter() - start)
    return {rows: float(np.median(times[1:])) for rows, times in seconds.items()}


def print_step_splits(splits, rows):
    """splits: {label: step_split(...)}; rows: {label: rows decoded per step}."""
    labels = list(splits)
    print("  per decoding step, ms (exclusive wall time by kind of work; "
          + ", ".join(f"{label}: {rows[label]} rows" for label in labels) + ")", flush=True)
    print("    " + f"{'':22s}" + "".join(f"{label:>14s}" for label in labels), flush=True)
    for kind in SPLIT + ("step",):
        values = [sum(splits[label].values()) if kind == "step" else splits[label][kind] for label in labels]
        print("    " + f"{kind:22s}" + "".join(f"{1000 * value:14.1f}" for value in values), flush=True)


def paddlenlp_inputs(sources, ids, new_tokens):
    """PaddleNLP's own recipe (GLMTokenizerMixin.build_inputs_for_generation) on the tokenizer's right-padded
    batch; the recipe reads only the mask and sop ids from the tokenizer, so no vocabulary file is needed."""
    length = max(len(source) for source in sources)
    input_ids = np.full((len(sources), length), ids.pad, dtype="int64")
    attention_mask = np.zeros_like(input_ids)
    for row, source in enumerate(sources):
        input_ids[row, : len(source)] = source
        attention_mask[row, : len(source)] = 1
    tokenizer = SimpleNamespace(mask_token_ids=list(ids.mask_ids), sop_token_id=ids.sop)
    batch = SimpleNamespace(input_ids=input_ids, attention_mask=attention_mask)
    inputs = GLMTokenizerMixin.build_inputs_for_generation(tokenizer, batch, max_gen_length=new_tokens)
    return {name: paddle.to_tensor(value) for name, value in inputs.items()}


def build(name, layers=None, **overrides):
    """Our GLM and PaddleNLP's with the same weights, both in eval mode, and the special ids."""
    shape = dict(SHAPES[name])
    ids = special_ids(shape.pop("eos"))
    if layers:
        shape["num_layers"] = layers
    config = dict(shape, output_predict=True, **overrides)
    paddle.seed(0)
    ours = glm.GLMForConditionalGeneration(glm.GLMConfig(**config))
    theirs = PaddleNLPGLM(PaddleNLPGLMConfig(**config))
    missing, unexpected = theirs.set_state_dict(ours.state_dict())
    assert not missing and not unexpected, (missing, unexpected)
    ours.eval()
    theirs.eval()
    # Our engine stops on <|endofpiece|> and <|endoftext|>, so both are banned on both sides. PaddleNLP's
    # min length blocks one id only, and its `logits_processors` argument crashes (get_logits_processor
    # iterates a LogitsProcessorList, which is not iterable): ban them in its per-model logits hook. Out of
    # place: greedy_search hands the hook the strided view `logits[:, -1, :]`, and Paddle 3.3.1's setitem
    # with a list index on a strided view writes outside it (it corrupted our model's weights).
    stop_bias = paddle.zeros([shape["vocab_size"]])
    stop_bias[[ids.eop, ids.eos]] = MASKED_SCORE

    def ban_stops(logits):
        return logits + stop_bias

    theirs.adjust_logits_during_generation = ban_stops
    return shape, ids, ours, theirs


def runners(ours, theirs, ids, sources, new_tokens):
    """generate() of each engine and strategy: each returns the generated token lists, one per prompt."""
    generator = GLMGenerator(ours, ids, banned_ids=[ids.eop, ids.eos])
    inputs = paddlenlp_inputs(sources, ids, new_tokens)

    def paddlenlp_greedy():
        output, _ = theirs.generate(
            **inputs, decode_strategy="greedy_search", max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            eos_token_id=ids.eop, pad_token_id=ids.pad,
        )
        return output.numpy().tolist()

    def ours_search(strategy, beams):
        config = GenerationConfig(decode_strategy=strategy, num_beams=beams, tgt_length=new_tokens)
        return lambda: [blanks[0][0] for blanks in generator.generate(sources, config)]

    return {
        "PaddleNLP greedy": paddlenlp_greedy,
        "ours greedy": ours_search("greedy_search", 1),
        f"ours beam {BEAMS}": ours_search("beam_search", BEAMS),
    }


def paddlenlp_beam_crash(theirs, ids, batch=4):
    """PaddleNLP's update_memories slices the batch axis (`hiddens[i][-new_memory_length:]`), so a first
    step over L positions keeps L rows of the batch x beams cache: it crashes when batch x beams > L."""
    sources = make_sources(ids, batch, 8, 8)
    rows, positions = batch * BEAMS, len(sources[0]) + 1  # + the appended <|startofpiece|>
    try:
        theirs.generate(**paddlenlp_inputs(sources, ids, 4), decode_strategy="beam_search", num_beams=BEAMS,
                        max_new_tokens=4, eos_token_id=ids.eop, pad_token_id=ids.pad)
        return f"ran ({batch} prompts x {BEAMS} beams = {rows} rows, {positions} positions): not reproduced"
    except Exception as error:  # noqa: BLE001  (the crash is what we show)
        message = str(error).strip().splitlines()[0][:160]
        return (f"crashed ({batch} prompts x {BEAMS} beams = {rows} rows > {positions} positions: update_memories "
                f"cached only the last {positions} rows of the batch axis): {type(error).__name__}: {message}")


def agreement(ours_tokens, their_tokens):
    same = sum(a == b for a, b in zip(ours_tokens, their_tokens))
    line = f"{same}/{len(ours_tokens)} prompts identical"
    for row, (a, b) in enumerate(zip(ours_tokens, their_tokens)):
        if a != b:
            step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            line += (f"; prompt {row} first differs at new token {step}: "
                     f"ours {a[step:step + 3]} vs PaddleNLP {b[step:step + 3]}")
            break
    return line


def bench(name, args):
    shape, ids, ours, theirs = build(name, args.layers if name == "large" else None)
    sources = make_sources(ids, args.prompts, args.shortest, args.longest)
    new_tokens = args.new_tokens
    print(f"{name}: layers={shape['num_layers']} hidden={shape['hidden_size']} vocab={shape['vocab_size']} "
          f"prompts={len(sources)} source tokens {min(map(len, sources))}-{max(map(len, sources))} "
          f"new tokens={new_tokens}", flush=True)
    print(f"  PaddleNLP beam search: {paddlenlp_beam_crash(theirs, ids)}", flush=True)

    # Warm-up (kernels, allocator) on a few tokens: a full-length PaddleNLP run costs as much as a timed one.
    for run in runners(ours, theirs, ids, sources, min(4, new_tokens)).values():
        run()
    runs = runners(ours, theirs, ids, sources, new_tokens)
    seconds = {label: [] for label in runs}
    outputs = {}
    # Interleave the engines so drift in machine load hits all alike.
    for step in range(args.steps):
        for label, run in runs.items():
            start = time.perf_counter()
            outputs[label] = run()
            seconds[label].append(time.perf_counter() - start)
            print(f"  run {step + 1}/{args.steps} {label:17s} {seconds[label][-1]:7.2f} s", flush=True)

    for label, tokens in outputs.items():
        assert all(len(t) == new_tokens for t in tokens), f"{label} did not generate exactly {new_tokens} tokens"
    # Every side returns prompts x new_tokens tokens (beam search: the best beam of each prompt).
    speed = {label: len(sources) * new_tokens / (sum(times) / len(times)) for label, times in seconds.items()}
    base = speed["PaddleNLP greedy"]
    for label, tokens_per_second in speed.items():
        print(f"  {label:17s} {tokens_per_second:8.1f} tok/s   {tokens_per_second / base:5.2f}x PaddleNLP greedy",
              flush=True)
    print(f"  ours beam {BEAMS} / ours greedy tokens/s: {speed[f'ours beam {BEAMS}'] / speed['ours greedy']:.2f}x",
          flush=True)
    print(f"  greedy tokens, ours vs PaddleNLP: {agreement(outputs['ours greedy'], outputs['PaddleNLP greedy'])}",
          flush=True)
    generator = GLMGenerator(ours, ids, banned_ids=[ids.eop, ids.eos])
    splits = {label: step_split(generator, ours, sources, strategy, beams, new_tokens)
              for label, strategy, beams in (("greedy", "greedy_search", 1), (f"beam {BEAMS}", "beam_search", BEAMS))}
    print_step_splits(splits, {"greedy": len(sources), f"beam {BEAMS}": len(sources) * BEAMS})
    floor = weight_matmul_seconds(ours, (len(sources), len(sources) * BEAMS))
    small, large = floor[len(sources)], floor[len(sources) * BEAMS]
    print(f"  weight matmuls of one step alone: {len(sources)} rows {1000 * small:.1f} ms, {len(sources) * BEAMS} rows "
          f"{1000 * large:.1f} ms ({large / small:.2f}x): a beam step cannot cost less than that", flush=True)
    if args.profile:
        for label in ("ours greedy", f"ours beam {BEAMS}"):
            print(f"  cProfile of one {label} run, by own time:", flush=True)
            profile = cProfile.Profile()
            profile.runcall(runs[label])
            pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
    return speed["ours greedy"] / base


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SHAPES), help="run one config only")
    parser.add_argument("--layers", type=int,
                        help=f"layers of the large slice (default {SHAPES['large']['num_layers']})")
    parser.add_argument("--steps", type=int, default=1,
                        help="timed generate calls per engine and strategy, interleaved (default 1: PaddleNLP takes "
                             "minutes on the large slice)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts in the batch (default 4)")
    parser.add_argument("--shortest", type=int, default=100, help="shortest source, in tokens (default 100)")
    parser.add_argument("--longest", type=int, default=200, help="longest source, in tokens (default 200)")
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="after timing, cProfile one run of ours (greedy, beam) and print its top N functions")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"paddle {paddle.__version__}, device {paddle.device.get_device()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    ratios = {name: bench(name, args) for name in ([args.only] if args.only else ["tiny", "large"])}
    print("ours / PaddleNLP greedy tokens/s: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
          + f"  (team target: >= 3x on large)   total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

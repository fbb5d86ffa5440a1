"""Decode tokens/s of our GLM engine (glm/generation.py) and of PaddleNLP's GLM `generate` on the same
weights, prompts and number of new tokens, in the same process; prints tokens/s, the ratio, whether the
greedy tokens of both agree, and what PaddleNLP's beam search does with short prompts.

    python bench/decode.py                          # tiny config and a glm-large-shaped slice (2 layers)
    python bench/decode.py --only large --layers 24 --steps 3

Both sides do the same work: exactly --new-tokens tokens per prompt, prompt encoding included. The stop
ids (<|endofpiece|>, <|endoftext|>) are banned on both sides, and PaddleNLP also gets min_new_tokens =
max_new_tokens. PaddleNLP is fed as its tokenizer's `build_inputs_for_generation` lays inputs out
(bench/workloads.py); ours gets the token lists and left-pads them itself. Both run with what importing
`glm` sets (both CPU cores, MKL's AVX2 kernels on AMD); bench/shipped.py compares them as each ships.

tokens/s = prompts x new tokens / seconds of one generate call. Beam search returns the best sequence
of each prompt, so its tokens/s counts those returned tokens (prompts x new tokens) although it decodes
beams x as many rows. Then the cost of one decoding step of ours, greedy and beam, split by kind of work
(weight matmuls, attention, cache writes, masks, reorder, NumPy search, host transfers: see StepSplit), and
the floors under a step: the weights read once, their products at Paddle's measured GEMM rate, and the
step's weight products alone. Not a test: figures only.
"""

import argparse
import cProfile
import functools
import os
import pstats
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import glm  # noqa: E402
from glm.cli.process import use_all_cores  # noqa: E402
import numpy as np  # noqa: E402
import paddle  # noqa: E402

import glm.generation  # noqa: E402
import glm.search  # noqa: E402
import glm.model_runner  # noqa: E402
import glm.modeling  # noqa: E402
from bench.workloads import (  # noqa: E402
    DECODE_SHAPES, make_sources, paddlenlp_greedy, paddlenlp_inputs, paddlenlp_model, special_ids)
from bench.machine import describe_machine  # noqa: E402
from glm.generation import GenerationConfig, GLMGenerator  # noqa: E402
from glm.decoding_cache import DecodingCache, DecodingMask  # noqa: E402
from glm.model_runner import DecodingRows  # noqa: E402
from glm.modeling import GLMAttention  # noqa: E402
from glm.packed_gemm import PackedLinears  # noqa: E402
from glm.packed_gemm import packed_transposed  # noqa: E402
from glm.tokenization import GLMSpecialIds  # noqa: E402

BEAMS = 5


# Wall time by default; --cpu-time: the process's CPU time, steadier when other jobs share the cores.
clock = time.perf_counter

SPLIT = ("weight matmuls", "attention", "cache writes/copies", "masks/positions", "reorder/drop rows",
         "search (NumPy)", "host transfers", "other ops")


class StepSplit:
    """Wall time of a generate call split by kind of work: the functions doing each kind are wrapped with
    timers that count exclusive time (a wrapped call inside another is charged to its own kind). CPU kernels
    run synchronously, so a call's wall time is its work. The model's own time outside the wrapped kinds
    (LayerNorm, GELU, embeddings, residual adds, Paddle's Python dispatch) and whatever runs outside every
    wrapped call is "other ops"; the search loops' own Python is "search"."""

    def __init__(self):
        self.seconds = dict.fromkeys(SPLIT, 0.0)
        self.stack = []  # [kind, seconds spent in wrapped children]

    def timed(self, kind, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            # paddle.concat is a cache copy only when GLMAttention.forward concatenates the memory itself
            charged = kind(self.stack) if callable(kind) else kind
            self.stack.append([charged, 0.0])
            start = clock()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = clock() - start
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
        patches += [(model, "lm_logits", "weight matmuls"), (PackedLinears, "linear", "weight matmuls")]
        for layer in model.sublayers():
            if isinstance(layer, GLMAttention):
                patches += [(layer, "_attention", "attention"), (layer, "decoding_attention", "attention"),
                            (layer, "forward", None)]
        in_attention_forward = lambda stack: "cache writes/copies" if stack and stack[-1][0] is None else None  # noqa: E731
        patches += [(DecodingCache, "write", "cache writes/copies"), (paddle, "concat", in_attention_forward),
                    (glm.modeling, "attention_bias", "masks/positions"), (DecodingMask, "advance", "masks/positions"),
                    (DecodingMask, "select", "reorder/drop rows"), (paddle, "index_select", "reorder/drop rows"),
                    (paddle, "to_tensor", "host transfers"), (glm.model_runner, "as_tensor", "host transfers"),
                    (paddle.Tensor, "numpy", "host transfers")]
        patches += [(glm.search, "advance_searches", "search (NumPy)")]
        patches += [(generator.runner, "logprobs", "search (NumPy)")]
        # The model runs inside the search loops: without its own frame, LayerNorm & co. would count as search.
        patches += [(generator.runner, "forward", "other ops"), (DecodingRows, "step", "masks/positions")]
        patches += [(glm.search, name, "search (NumPy)") for name in
                    ("process_scores", "beam_candidates", "top_k_indices", "choose_beams", "sample_tokens")]
        patches += [(glm.model_runner, "log_softmax", "search (NumPy)")]
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


def step_split(generator, model, sources, strategy, beams, new_tokens, repeats=3):
    """Seconds per decoding step by kind of work: the split of a call making `new_tokens` tokens minus that of
    a call making 1 (prompt encoding, <|startofpiece|> step, set-up), over new_tokens - 1 steps; the median
    over `repeats` such pairs, per kind (the machine's load drifts)."""
    differences = []
    for _ in range(repeats):
        splits = []
        for tokens in (new_tokens, 1):
            config = GenerationConfig(decode_strategy=strategy, num_beams=beams, tgt_length=tokens)
            split = StepSplit()
            with split.watching(model, generator):
                start = clock()
                generator.generate(sources, config)
                total = clock() - start
            split.seconds["other ops"] += total - sum(split.seconds.values())
            splits.append(split.seconds)
        differences.append({kind: (splits[0][kind] - splits[1][kind]) / (new_tokens - 1) for kind in SPLIT})
    return {kind: float(np.median([difference[kind] for difference in differences])) for kind in SPLIT}


def weight_matmul_seconds(model, row_counts, repeats=5):
    """Median seconds of one step's weight matmuls alone (every Linear, then the LM head) at each row count,
    the counts interleaved: what a step costs at the least with Paddle's matmuls, and how it grows with rows."""
    linears = [layer for layer in model.sublayers() if isinstance(layer, paddle.nn.Linear)]
    hidden = model.glm.word_embeddings.weight.shape[1]
    inputs = {rows: ([paddle.randn([rows, 1, layer.weight.shape[0]]) for layer in linears], paddle.randn([rows, hidden]))
              for rows in row_counts}
    seconds = {rows: [] for rows in row_counts}
    packed = packed_transposed(model.glm.word_embeddings.weight, max(row_counts))  # as generate does
    with paddle.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for rows, (linear_inputs, head_input) in inputs.items():
                start = clock()
                for layer, x in zip(linears, linear_inputs):
                    layer(x)
                model.lm_logits(head_input, packed=packed)
                seconds[rows].append(clock() - start)
    return {rows: float(np.median(times[1:])) for rows, times in seconds.items()}


def weight_read_seconds(model, repeats=5):
    """Median seconds to read every weight matrix of a step once (a sum over each): the memory-bandwidth
    floor under any step, whatever its rows."""
    weights = [layer.weight for layer in model.sublayers() if isinstance(layer, paddle.nn.Linear)]
    weights.append(model.glm.word_embeddings.weight)  # the LM head
    seconds = []
    for _ in range(repeats + 1):
        start = clock()
        for weight in weights:
            weight.sum()
        seconds.append(clock() - start)
    return float(np.median(seconds[1:])), sum(weight.numel().item() for weight in weights)


def gemm_flops_per_second(size=2048, repeats=3):
    """Paddle's float32 matmul rate on a large square product, the best of `repeats`: the compute floor."""
    a = paddle.randn([size, size])
    paddle.matmul(a, a)
    best = min(_seconds(lambda: paddle.matmul(a, a)) for _ in range(repeats))
    return 2 * size**3 / best


def _seconds(function):
    start = clock()
    function()
    return clock() - start


def print_floors(model, rows, steps):
    """rows: {label: rows per step}; steps: {label: measured seconds per step}."""
    read, parameters = weight_read_seconds(model)
    rate = gemm_flops_per_second()
    products = weight_matmul_seconds(model, tuple(rows.values()))
    print(f"  floors per step: weights read once ({4 * parameters / 2**20:.0f} MiB) {1000 * read:.1f} ms; "
          f"Paddle's GEMM rate {rate / 1e9:.0f} GFLOP/s", flush=True)
    for label, count in rows.items():
        compute = 2 * count * parameters / rate
        print(f"    {label:8s} ({count:2d} rows): compute at that rate {1000 * compute:5.1f} ms, weight products "
              f"alone {1000 * products[count]:5.1f} ms, the step {1000 * steps[label]:5.1f} ms = "
              f"{steps[label] / read:.2f}x the read floor", flush=True)


def print_step_splits(splits, rows):
    """splits: {label: step_split(...)}; rows: {label: rows decoded per step}."""
    labels = list(splits)
    print(f"  per decoding step, ms (exclusive {'CPU' if clock is time.process_time else 'wall'} time by kind of work; "
          + ", ".join(f"{label}: {rows[label]} rows" for label in labels) + ")", flush=True)
    print("    " + f"{'':22s}" + "".join(f"{label:>14s}" for label in labels), flush=True)
    for kind in SPLIT + ("step",):
        values = [sum(splits[label].values()) if kind == "step" else splits[label][kind] for label in labels]
        print("    " + f"{kind:22s}" + "".join(f"{1000 * value:14.1f}" for value in values), flush=True)


def build(name, layers=None, **overrides):
    """Our GLM and PaddleNLP's with the same weights, both in eval mode, and the special ids."""
    shape = dict(DECODE_SHAPES[name])
    ids = special_ids(shape.pop("eos"))
    if layers:
        shape["num_layers"] = layers
    paddle.seed(0)
    ours = glm.GLMForConditionalGeneration(glm.GLMConfig(**shape, output_predict=True, **overrides))
    ours.eval()
    theirs = paddlenlp_model(shape, (ids["eop"], ids["eos"]), **overrides)
    missing, unexpected = theirs.set_state_dict(ours.state_dict())
    assert not missing and not unexpected, (missing, unexpected)
    return shape, ids, ours, theirs


def our_generator(model, ids):
    """Our engine with the stop ids banned, as PaddleNLP's side has them (exactly new-tokens tokens)."""
    return GLMGenerator(model, GLMSpecialIds(**ids), banned_ids=[ids["eop"], ids["eos"]])


def runners(ours, theirs, ids, sources, new_tokens):
    """generate() of each engine and strategy: each returns the generated token lists, one per prompt."""
    generator = our_generator(ours, ids)

    def ours_search(strategy, beams):
        config = GenerationConfig(decode_strategy=strategy, num_beams=beams, tgt_length=new_tokens)
        return lambda: [blanks[0][0] for blanks in generator.generate(sources, config)]

    return {
        "PaddleNLP greedy": paddlenlp_greedy(theirs, ids, sources, new_tokens),
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
                        max_new_tokens=4, eos_token_id=ids["eop"], pad_token_id=ids["eos"])
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
    if not args.ours_only:
        print(f"  PaddleNLP beam search: {paddlenlp_beam_crash(theirs, ids)}", flush=True)

    def engines(tokens):
        runs = runners(ours, theirs, ids, sources, tokens)
        return {label: run for label, run in runs.items() if not (args.ours_only and label.startswith("PaddleNLP"))}

    # Warm-up (kernels, allocator) on a few tokens: a full-length PaddleNLP run costs as much as a timed one.
    for run in engines(min(4, new_tokens)).values():
        run()
    runs = engines(new_tokens)
    seconds = {label: [] for label in runs}
    outputs = {}
    # Interleave the engines so drift in machine load hits all alike.
    for step in range(args.steps):
        for label, run in runs.items():
            start = clock()
            outputs[label] = run()
            seconds[label].append(clock() - start)
            print(f"  run {step + 1}/{args.steps} {label:17s} {seconds[label][-1]:7.2f} s", flush=True)

    for label, tokens in outputs.items():
        assert all(len(t) == new_tokens for t in tokens), f"{label} did not generate exactly {new_tokens} tokens"
    # Every side returns prompts x new_tokens tokens (beam search: the best beam of each prompt).
    speed = {label: len(sources) * new_tokens / (sum(times) / len(times)) for label, times in seconds.items()}
    base = speed.get("PaddleNLP greedy")
    for label, tokens_per_second in speed.items():
        ratio = f"   {tokens_per_second / base:5.2f}x PaddleNLP greedy" if base else ""
        print(f"  {label:17s} {tokens_per_second:8.1f} tok/s{ratio}", flush=True)
    print(f"  ours beam {BEAMS} / ours greedy tokens/s: {speed[f'ours beam {BEAMS}'] / speed['ours greedy']:.2f}x",
          flush=True)
    if base:
        print(f"  greedy tokens, ours vs PaddleNLP: {agreement(outputs['ours greedy'], outputs['PaddleNLP greedy'])}",
              flush=True)
    generator = our_generator(ours, ids)
    strategies = (("greedy", "greedy_search", 1), (f"beam {BEAMS}", "beam_search", BEAMS))
    splits = {label: step_split(generator, ours, sources, strategy, beams, new_tokens)
              for label, strategy, beams in strategies}
    rows = {"greedy": len(sources), f"beam {BEAMS}": len(sources) * BEAMS}
    print_step_splits(splits, rows)
    print_floors(ours, rows, {label: sum(split.values()) for label, split in splits.items()})
    if args.profile:
        for label in ("ours greedy", f"ours beam {BEAMS}"):
            print(f"  cProfile of one {label} run, by own time:", flush=True)
            profile = cProfile.Profile()
            profile.runcall(runs[label])
            pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
    return speed["ours greedy"] / base if base else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(DECODE_SHAPES), help="run one config only")
    parser.add_argument("--layers", type=int,
                        help=f"layers of the large slice (default {DECODE_SHAPES['large']['num_layers']})")
    parser.add_argument("--steps", type=int, default=1,
                        help="timed generate calls per engine and strategy, interleaved (default 1: PaddleNLP takes "
                             "minutes on the large slice)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts in the batch (default 4)")
    parser.add_argument("--shortest", type=int, default=100, help="shortest source, in tokens (default 100)")
    parser.add_argument("--longest", type=int, default=200, help="longest source, in tokens (default 200)")
    parser.add_argument("--ours-only", action="store_true",
                        help="leave PaddleNLP out: our tokens/s, the per-step split and the floors")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by the process's CPU time, not wall time: steadier on a shared machine; meant "
                             "for OMP_NUM_THREADS=1 (with more threads it adds theirs up, OpenMP's spinning too)")
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="after timing, cProfile one run of ours (greedy, beam) and print its top N functions")
    args = parser.parse_args()
    use_all_cores()  # as the entry scripts run
    global clock
    clock = time.process_time if args.cpu_time else time.perf_counter
    start = time.perf_counter()
    print(f"{describe_machine()}; paddle {paddle.__version__} on {paddle.device.get_device()}; "
          f"{'CPU' if args.cpu_time else 'wall'} time", flush=True)
    ratios = {name: bench(name, args) for name in ([args.only] if args.only else ["tiny", "large"])}
    if not args.ours_only:
        print("ours / PaddleNLP greedy tokens/s: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
              + "  (aim: >= 10x on large)", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s; {describe_machine()}", flush=True)


if __name__ == "__main__":
    main()

"""Ours and PaddleNLP's GLM as each ships: each alone in its own process, the processes interleaved, on a
glm-large-shaped slice (2 layers, hidden 1024, vocab 50048). Prints the SFT step's tokens/s (batch 2 x 512)
and greedy decoding's (4 prompts of 100-200 tokens, 128 new tokens) of both, the ratios round by round,
and our beam 5.

    python bench/shipped.py                          # 3 rounds
    python bench/shipped.py --rounds 5 --baseline DIR # also another checkout of ours, e.g. before a change

A PaddleNLP process imports paddle and paddlenlp only, never `glm`, so it runs as a PaddleNLP user's
does: Paddle's OMP_NUM_THREADS=1 and, on AMD, MKL's default kernels (unless the caller's environment sets
them; both sides then get them). Ours runs as glm's entry scripts do: every core, freed memory returned (glm.cli.process) and, on
AMD CPUs with AVX2 and FMA, MKL's AVX2 kernels (importing `glm`). Every process loads the same weights (written once by a setup process) and
builds the same batch, so the first training loss and the greedy tokens are compared across processes.
Each process times its own work after a warm-up: process start and model building are not counted.
bench/train_step.py and bench/decode.py compare both in one process, both with glm's settings.
Not a test: figures only.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench.* from this checkout (an "ours" child puts its glm checkout first)

from bench.machine import describe_machine, paddle_threads  # noqa: E402

RESULT = "RESULT "  # a child's last line: RESULT {json}
PROMPTS, SHORTEST, LONGEST, BEAMS = 4, 100, 200, 5


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="processes per side, interleaved (default 3)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per process (default 2)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    parser.add_argument("--baseline", metavar="DIR", help="also time the glm package of this checkout (as 'baseline')")
    parser.add_argument("--tasks", default="train,decode", help="comma-separated: train, decode (default both)")
    parser.add_argument("--shape", choices=["large", "tiny"], default="large",
                        help="the model: the glm-large-shaped slice (default) or bench/workloads.py's tiny one")
    parser.add_argument("--child", choices=["weights", "ours", "paddlenlp"], help=argparse.SUPPRESS)
    parser.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    sides = {"ours": ROOT, "PaddleNLP": None}
    if args.baseline:
        sides["baseline"] = os.path.abspath(args.baseline)
    with tempfile.TemporaryDirectory() as scratch:
        weights = os.path.join(scratch, "weights.pdparams")
        child(["--child", "weights", "--weights", weights, "--shape", args.shape])
        print(describe_machine(), flush=True)
        results = measure(sides, weights, args)
        for task in args.tasks.split(","):
            report(task, {side: [result[task] for result in rounds] for side, rounds in results.items()})
        print(describe_machine(), flush=True)


def child(arguments):
    """Runs this script in a fresh process with the caller's environment; returns its RESULT."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *arguments], capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def measure(sides, weights, args):
    """{side: [{task: result} per round]}: one process per side and round (doing every task), the sides'
    processes interleaved round by round."""
    results = {side: [] for side in sides}
    for round_number in range(args.rounds):
        for side, root in sides.items():
            arguments = ["--child", "paddlenlp" if root is None else "ours", "--tasks", args.tasks, "--weights",
                         weights, "--shape", args.shape, "--steps", str(args.steps), "--new-tokens", str(args.new_tokens)]
            results[side].append(child(arguments + (["--root", root] if root else [])))
            speeds = [f"{name} {value:.1f}" for result in results[side][-1].values() for name, value in
                      result["speed"].items()]
            print(f"  round {round_number + 1}/{args.rounds} {side:9s} tok/s: " + ", ".join(speeds), flush=True)
    return results


def report(task, results):
    work = results["PaddleNLP"][0]["work"]
    if task == "train":
        print(f"SFT step, {work}, each side in its own process:", flush=True)
    else:
        print(f"decoding, {work} (tok/s: prompts x new tokens / seconds of one generate call), each side in its own "
              "process:", flush=True)
    for side, rounds in results.items():
        environment = rounds[0]["environment"]
        for name in rounds[0]["speed"]:
            speeds = [result["speed"][name] for result in rounds]
            print(f"  {side:9s} {name:8s} median {statistics.median(speeds):7.1f} tok/s (rounds: "
                  + ", ".join(f"{speed:.1f}" for speed in speeds) + f")   {environment}", flush=True)
    base = [result["speed"]["greedy" if task == "decode" else "step"] for result in results["PaddleNLP"]]
    for side in results:
        if side == "PaddleNLP":
            continue
        for name in results[side][0]["speed"]:
            ratios = [result["speed"][name] / theirs for result, theirs in zip(results[side], base)]
            print(f"  {side} {name} / PaddleNLP {'greedy' if task == 'decode' else 'step'}: median "
                  f"{statistics.median(ratios):.2f}x (rounds: " + ", ".join(f"{r:.2f}" for r in ratios) + ")", flush=True)
        if task == "decode":
            ratios = [result["speed"][f"beam {BEAMS}"] / result["speed"]["greedy"] for result in results[side]]
            print(f"  {side} beam {BEAMS} / {side} greedy: median {statistics.median(ratios):.2f}x (rounds: "
                  + ", ".join(f"{r:.2f}" for r in ratios) + ")", flush=True)
    key = "tokens" if task == "decode" else "loss"
    theirs = results["PaddleNLP"][0][key]
    for side in results:
        if side != "PaddleNLP":
            ours = results[side][0][key]
            same = ours == theirs if task == "decode" else abs(ours - theirs) <= 1e-4 * abs(theirs)
            print(f"  {side} vs PaddleNLP, {'greedy tokens' if task == 'decode' else 'first loss'}: "
                  f"{'identical' if same else 'DIFFERENT'}" + ("" if task == "decode" else f" ({ours:.6f} vs {theirs:.6f})"),
                  flush=True)


# -- the child processes -----------------------------------------------------------------------------------


def run_child(args):
    if args.child == "ours":
        sys.path.insert(0, args.root)  # before this checkout: --baseline's glm is imported from its own
        import glm  # noqa: F401  (MKL's kernels)

        try:
            from glm.cli.process import return_freed_memory, use_all_cores
        except ImportError:  # a --baseline checkout from before glm.cli: its import set the threads
            return_freed_memory = use_all_cores = None
        if use_all_cores:
            use_all_cores()  # as the entry scripts run
            return_freed_memory()
    from bench import workloads

    shape = dict(workloads.DECODE_SHAPES[args.shape])
    ids = workloads.special_ids(shape.pop("eos"))
    if args.child == "weights":
        import paddle

        paddle.seed(0)
        paddle.save(workloads.paddlenlp_model(shape).state_dict(), args.weights)
        return emit({})
    environment = f"threads={paddle_threads()} MKL_DEBUG_CPU_TYPE={os.environ.get('MKL_DEBUG_CPU_TYPE')}"
    results = {}
    for task in args.tasks.split(","):  # each on a fresh model: training changes the weights
        work = child_training if task == "train" else child_decoding
        results[task] = dict(work(args, child_model(args, shape, ids), shape, ids), environment=environment)
    return emit(results)


def emit(result):
    print(RESULT + json.dumps(result), flush=True)


def child_model(args, shape, ids):
    import paddle
    from bench import workloads

    if args.child == "ours":
        import glm

        model = glm.GLMForConditionalGeneration(glm.GLMConfig(**shape, output_predict=True))
    else:
        model = workloads.paddlenlp_model(shape, (ids["eop"], ids["eos"]))
    missing, unexpected = model.set_state_dict(paddle.load(args.weights))
    assert not missing and not unexpected, (missing, unexpected)
    return model


def child_training(args, model, shape, ids):
    import time

    import paddle
    from bench import workloads

    batch, seq = workloads.TRAIN_SHAPES[args.shape]["batch"], workloads.TRAIN_SHAPES[args.shape]["seq"]
    paddle.seed(1)  # the same batch in every process
    inputs, sep, mask_4d = workloads.training_batch(batch, seq, shape["vocab_size"])
    model.train()
    # ours is fed the 1-D sep it gets in training; PaddleNLP the 4-D mask (its 1-D path never runs)
    step = workloads.training_step(model, dict(inputs, attention_mask=sep if args.child == "ours" else mask_4d))
    loss = step()  # warm-up: kernels, allocator, optimizer state
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    return dict(speed={"step": batch * seq / seconds}, loss=loss, work=f"{describe(shape)}, batch {batch} x {seq}")


def child_decoding(args, model, shape, ids):
    import time

    from bench import workloads

    model.eval()
    sources = workloads.make_sources(ids, PROMPTS, SHORTEST, LONGEST)
    runs = decoding_runs(args, model, ids, sources)
    for run in decoding_runs(args, model, ids, sources, new_tokens=4).values():
        run()  # warm-up: kernels, allocator
    speed, outputs = {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        outputs[name] = run()
        speed[name] = PROMPTS * args.new_tokens / (time.perf_counter() - start)
        assert all(len(answer) == args.new_tokens for answer in outputs[name]), f"{name}: not {args.new_tokens} tokens"
    work = f"{describe(shape)}, {PROMPTS} prompts of {SHORTEST}-{LONGEST} tokens, {args.new_tokens} new tokens"
    return dict(speed=speed, tokens=outputs["greedy"], work=work)


def describe(shape):
    return f"{shape['num_layers']} layers x hidden {shape['hidden_size']}, vocab {shape['vocab_size']}"


def decoding_runs(args, model, ids, sources, new_tokens=None):
    """{name: function returning the tokens per prompt}: greedy, then (ours only) beam search."""
    from bench import workloads

    new_tokens = new_tokens or args.new_tokens
    if args.child == "paddlenlp":
        return {"greedy": workloads.paddlenlp_greedy(model, ids, sources, new_tokens)}
    from glm.generation import GenerationConfig, GLMGenerator
    from glm.tokenization import GLMSpecialIds

    generator = GLMGenerator(model, GLMSpecialIds(**ids), banned_ids=[ids["eop"], ids["eos"]])

    def search(strategy, beams):
        config = GenerationConfig(decode_strategy=strategy, num_beams=beams, tgt_length=new_tokens)
        return lambda: [blanks[0][0] for blanks in generator.generate(sources, config)]

    return {"greedy": search("greedy_search", 1), f"beam {BEAMS}": search("beam_search", BEAMS)}


if __name__ == "__main__":
    main()

"""Time one training step (forward, backward, AdamW step) of our GLM and of PaddleNLP's on the same
weights, config and batch, in the same process, and print tokens/s and the ratio.

    python bench/train_step.py                  # tiny config and a glm-large-shaped slice
    python bench/train_step.py --only large --layers 4 --steps 5

The batch is a GLM generation example (bench/workloads.py's training_batch). Both run with what
importing `glm` sets (both CPU cores, MKL's AVX2 kernels on AMD); bench/shipped.py compares them as
each ships.

Then the peak memory (RSS) of our training steps on the large slice with and without recompute (what
the Trainer's --recompute switches on), each measured in a fresh process so neither inherits the other's
peak. Not a test: figures only.
"""

import argparse
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import glm  # noqa: E402
from glm.cli.process import use_all_cores  # noqa: E402
import paddle  # noqa: E402

from bench.machine import describe_machine  # noqa: E402
from bench.workloads import TRAIN_SHAPES, paddlenlp_model, training_batch, training_step  # noqa: E402


def time_steps(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def twin_models(config):
    """Ours and PaddleNLP's GLM with identical weights, in training mode (config without output_predict)."""
    paddle.seed(0)
    ours = glm.GLMForConditionalGeneration(glm.GLMConfig(**config, output_predict=True))
    theirs = paddlenlp_model(config)
    theirs.set_state_dict(ours.state_dict())
    ours.train()
    theirs.train()
    return ours, theirs


def interleaved_seconds(ours_step, theirs_step, steps):
    """Seconds per step of each, after a warm-up (kernels, allocator, optimizer state), the two interleaved
    so that drift in machine load hits both alike."""
    for step in (ours_step, theirs_step):
        step()
    ours_times, theirs_times = [], []
    for _ in range(steps):
        ours_times.append(time_steps(ours_step, 1))
        theirs_times.append(time_steps(theirs_step, 1))
    return sum(ours_times) / steps, sum(theirs_times) / steps


def bench(name, shape, steps, num_layers=None):
    shape = dict(shape)
    seq, batch = shape.pop("seq"), shape.pop("batch")
    if num_layers:
        shape["num_layers"] = num_layers
    ours, theirs = twin_models(dict(shape, max_sequence_length=1024))
    inputs, sep, mask_4d = training_batch(batch, seq, shape["vocab_size"])
    ours_seconds, theirs_seconds = interleaved_seconds(
        training_step(ours, dict(inputs, attention_mask=sep)), training_step(theirs, dict(inputs, attention_mask=mask_4d)), steps)
    tokens = batch * seq
    ours_tps, theirs_tps = tokens / ours_seconds, tokens / theirs_seconds
    print(
        f"{name:6s} layers={shape['num_layers']} hidden={shape['hidden_size']} vocab={shape['vocab_size']} "
        f"batch={batch} seq={seq}: ours {ours_tps:8.1f} tok/s   PaddleNLP {theirs_tps:8.1f} tok/s   "
        f"ratio {ours_tps / theirs_tps:.2f}x",
        flush=True,
    )


def peak_rss_child(name, layers, batch, recompute, steps=3):
    """In a child process: a few training steps of our model alone; prints the process's peak RSS."""
    shape = dict(TRAIN_SHAPES[name])
    seq, _ = shape.pop("seq"), shape.pop("batch")
    if layers:
        shape["num_layers"] = layers
    paddle.seed(0)
    model = glm.GLMForConditionalGeneration(glm.GLMConfig(**shape, max_sequence_length=1024))
    model.glm.transformer.enable_recompute = recompute  # what the Trainer's --recompute sets
    model.train()
    inputs, sep, _ = training_batch(batch, seq, shape["vocab_size"])
    step = training_step(model, dict(inputs, attention_mask=sep))
    for _ in range(steps):
        step()
    print(f"peak_rss_mib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


def peak_rss(name, layers, batch, recompute):
    command = [sys.executable, os.path.abspath(__file__), "--rss-child", name, "--rss-batch", str(batch)]
    command += ["--layers", str(layers)] if layers else []
    output = subprocess.run(command + (["--recompute"] if recompute else []), capture_output=True, text=True, check=True)
    return float(output.stdout.split("peak_rss_mib")[-1])


def print_peak_rss(name, layers, batch):
    without, with_recompute = peak_rss(name, layers, batch, False), peak_rss(name, layers, batch, True)
    shape = TRAIN_SHAPES[name]
    print(f"{name:6s} layers={layers or shape['num_layers']} batch={batch} seq={shape['seq']}: peak RSS of "
          f"3 training steps, separate processes: without recompute {without:.0f} MiB, with recompute "
          f"{with_recompute:.0f} MiB ({with_recompute - without:+.0f} MiB)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(TRAIN_SHAPES), help="run one shape only")
    parser.add_argument("--layers", type=int, help="layers of the large slice (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (default 5)")
    parser.add_argument("--rss-batch", type=int, default=8,
                        help="batch of the peak-RSS runs (default 8: activations, what recompute saves, then "
                             "outweigh weights and AdamW state)")
    parser.add_argument("--rss-child", choices=sorted(TRAIN_SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--recompute", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_all_cores()  # as the entry scripts run
    if args.rss_child:
        return peak_rss_child(args.rss_child, args.layers, args.rss_batch, args.recompute)
    print(f"{describe_machine()}; paddle {paddle.__version__} on {paddle.device.get_device()}", flush=True)
    for name in [args.only] if args.only else ["tiny", "large"]:
        bench(name, TRAIN_SHAPES[name], args.steps, args.layers if name == "large" else None)
    print_peak_rss("large", args.layers, args.rss_batch)


if __name__ == "__main__":
    main()

"""Time one training step (forward, backward, AdamW step) of our GLM and of PaddleNLP's on the same
weights, config and batch, in the same process, and print tokens/s and the ratio.

    python bench/train_step.py                  # tiny config and a glm-large-shaped slice
    python bench/train_step.py --only large --layers 4 --steps 5

The batch is a GLM generation example: a bidirectional source then a causal target carrying the loss
(source 3/4 of the sequence, like src_length 608 / tgt_length 160). PaddleNLP gets the 4-D 0/1 mask
(its 1-D `sep` path never runs); ours gets the 1-D sep it is fed in training.

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

import glm  # noqa: E402  (sets the CPU thread count before paddle is imported)
import paddle  # noqa: E402
from paddlenlp.transformers import GLMConfig as PaddleNLPGLMConfig  # noqa: E402
from paddlenlp.transformers import GLMForConditionalGeneration as PaddleNLPGLM  # noqa: E402

SHAPES = {
    "tiny": dict(num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=8192, seq=128, batch=8),
    "large": dict(num_layers=2, hidden_size=1024, num_attention_heads=16, vocab_size=50048, seq=512, batch=2),
}


def make_batch(batch, seq, vocab_size):
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
    keys, queries = positions.reshape([1, 1, seq]), positions.reshape([1, seq, 1])
    mask_4d = ((keys < source_length) | (keys <= queries)).astype("float32").unsqueeze(1).expand([batch, 1, seq, seq])
    loss_mask = (positions >= source_length - 1).astype("float32").unsqueeze(0).expand([batch, seq])
    labels = paddle.randint(0, vocab_size, [batch, seq])
    return dict(input_ids=input_ids, position_ids=position_ids, labels=labels, loss_mask=loss_mask), sep, mask_4d


def step_timer(model, inputs):
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-5, parameters=model.parameters(), weight_decay=0.1)

    def step():
        loss = model(**inputs, return_dict=True).loss
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        return float(loss)

    return step


def time_steps(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def twin_models(config):
    """Ours and PaddleNLP's GLM with identical weights, in training mode."""
    paddle.seed(0)
    ours = glm.GLMForConditionalGeneration(glm.GLMConfig(**config))
    theirs = PaddleNLPGLM(PaddleNLPGLMConfig(**config))
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
    ours, theirs = twin_models(dict(shape, max_sequence_length=1024, output_predict=True))
    inputs, sep, mask_4d = make_batch(batch, seq, shape["vocab_size"])
    ours_seconds, theirs_seconds = interleaved_seconds(
        step_timer(ours, dict(inputs, attention_mask=sep)), step_timer(theirs, dict(inputs, attention_mask=mask_4d)), steps)
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
    shape = dict(SHAPES[name])
    seq, _ = shape.pop("seq"), shape.pop("batch")
    if layers:
        shape["num_layers"] = layers
    paddle.seed(0)
    model = glm.GLMForConditionalGeneration(glm.GLMConfig(**shape, max_sequence_length=1024))
    model.glm.transformer.enable_recompute = recompute  # what the Trainer's --recompute sets
    model.train()
    inputs, sep, _ = make_batch(batch, seq, shape["vocab_size"])
    step = step_timer(model, dict(inputs, attention_mask=sep))
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
    shape = SHAPES[name]
    print(f"{name:6s} layers={layers or shape['num_layers']} batch={batch} seq={shape['seq']}: peak RSS of "
          f"3 training steps, separate processes: without recompute {without:.0f} MiB, with recompute "
          f"{with_recompute:.0f} MiB ({with_recompute - without:+.0f} MiB)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SHAPES), help="run one shape only")
    parser.add_argument("--layers", type=int, help="layers of the large slice (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (default 5)")
    parser.add_argument("--rss-batch", type=int, default=8,
                        help="batch of the peak-RSS runs (default 8: activations, what recompute saves, then "
                             "outweigh weights and AdamW state)")
    parser.add_argument("--rss-child", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--recompute", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return peak_rss_child(args.rss_child, args.layers, args.rss_batch, args.recompute)
    print(f"paddle {paddle.__version__}, device {paddle.device.get_device()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    for name in [args.only] if args.only else ["tiny", "large"]:
        bench(name, SHAPES[name], args.steps, args.layers if name == "large" else None)
    print_peak_rss("large", args.layers, args.rss_batch)


if __name__ == "__main__":
    main()

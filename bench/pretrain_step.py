"""Pretraining speed: tokens/s of one training step (forward, backward, AdamW) of our GLM and of
PaddleNLP's `GLMForConditionalGeneration` with identical weights on the same blank-infilling batches, in
the same process, interleaved; then how many examples/s the batch builder makes on one core against how
many the step consumes.

    python bench/pretrain_step.py                       # glm-large-shaped slice: 2 layers, hidden 1024
    python bench/pretrain_step.py --layers 4 --steps 6 --batch_size 4

The batches are what training builds (glm/pretraining: windows of People's Daily in ../shared, prepared
with the real GLM Chinese tokenizer, one batch per objective: token, sentence and document), 2 x 512
tokens by default. PaddleNLP gets the 4-D 0/1 mask made from each row's sep (its 1-D path never runs);
ours the sep. tokens/s counts the batch's real (unpadded) tokens. Not a test: figures only.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import glm  # noqa: E402,F401
from glm.cli.process import use_all_cores  # noqa: E402
import numpy as np  # noqa: E402
import paddle  # noqa: E402
from pretraining_memory import prepare, tokenizer_dir  # noqa: E402
from train_step import interleaved_seconds, twin_models  # noqa: E402

from bench.machine import describe_machine  # noqa: E402
from bench.workloads import sep_mask, training_step  # noqa: E402

from glm.inputs import collate_examples  # noqa: E402
from glm.pretraining.dataset import BatchCollator, PretrainingDataset  # noqa: E402
from glm.pretraining.objective import OBJECTIVES, BlankInfillingBuilder, PretrainingArguments, sentence_end_table  # noqa: E402
from glm.pretraining.windows import WindowSampler  # noqa: E402
from glm.tokenization import load_tokenizer, special_token_ids  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/glm-pretraining-memory", help="the prepared corpus is kept here")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model and objective")
    parser.add_argument("--builder_batches", type=int, default=300, help="batches timed for the builder")
    args = parser.parse_args()
    use_all_cores()  # as the entry scripts run
    print(f"{describe_machine()}; paddle {paddle.__version__} on {paddle.device.get_device()}", flush=True)

    os.makedirs(args.work_dir, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_dir(args.work_dir))
    ids, ends = special_token_ids(tokenizer), sentence_end_table(tokenizer)
    corpus = prepare(args.work_dir, 1, tokenizer)
    windows = WindowSampler(corpus, args.seq_length, ids, ends, seed=1)
    builder = BlankInfillingBuilder(PretrainingArguments(seq_length=args.seq_length), ids, ends)

    ours, theirs = twin_models(dict(num_layers=args.layers, hidden_size=1024, num_attention_heads=16,
                                    vocab_size=50048, max_sequence_length=1024))
    step_seconds, speeds = [], {}
    for number, objective in enumerate(OBJECTIVES):
        rng = np.random.default_rng([1, number])
        examples = builder.build([windows.window(100 * number + i) for i in range(args.batch_size)], objective, rng)
        batch = collate_examples([e.features() for e in examples], ids.pad)
        tokens = sum(len(e.input_ids) for e in examples)
        inputs = {k: paddle.to_tensor(v) for k, v in batch.items() if k != "attention_mask"}
        mask = paddle.to_tensor(sep_mask(batch["attention_mask"], batch["input_ids"].shape[1]))
        ours_seconds, theirs_seconds = interleaved_seconds(
            training_step(ours, dict(inputs, attention_mask=paddle.to_tensor(batch["attention_mask"]))),
            training_step(theirs, dict(inputs, attention_mask=mask)), args.steps)
        ours_tps, theirs_tps = tokens / ours_seconds, tokens / theirs_seconds
        step_seconds.append(ours_seconds)
        speeds[objective] = (ours_tps, theirs_tps)
        print(f"{objective:8s} layers={args.layers} hidden=1024 vocab=50048 batch={args.batch_size} x "
              f"{batch['input_ids'].shape[1]} ({tokens} tokens, {int(batch['loss_mask'].sum())} scored): "
              f"ours {ours_tps:7.1f} tok/s   PaddleNLP {theirs_tps:7.1f} tok/s   ratio {ours_tps / theirs_tps:.2f}x", flush=True)

    # A run's tokens/s: each objective takes its share of the batches (time per token averaged by the mix).
    mixture = builder.args.mixture()
    ours_mix, theirs_mix = (1 / sum(mixture[o] / speeds[o][side] for o in OBJECTIVES) for side in (0, 1))
    shares = "/".join(f"{mixture[o]:g}" for o in OBJECTIVES)
    print(f"mixture  (token/sentence/document batches {shares}): ours {ours_mix:7.1f} tok/s   PaddleNLP "
          f"{theirs_mix:7.1f} tok/s   ratio {ours_mix / theirs_mix:.2f}x", flush=True)

    # The builder as training runs it (collate_fn in the main process): windows from the memory map,
    # the objective drawn per batch, examples built and padded. NumPy and Python here use one core.
    dataset = PretrainingDataset(windows, args.builder_batches * args.batch_size)
    collator = BatchCollator(builder, seed=1, pad_id=ids.pad)
    started, examples = time.perf_counter(), 0
    for batch in range(args.builder_batches):
        samples = [dataset[i] for i in range(batch * args.batch_size, (batch + 1) * args.batch_size)]
        examples += len(collator(samples)["input_ids"])  # short pieces make more rows than windows
    built = examples / (time.perf_counter() - started)
    consumed = args.batch_size / np.mean(step_seconds)
    print(f"builder: {built:.0f} examples/s on one core; the step above consumes {consumed:.2f} examples/s "
          f"(our mean step {np.mean(step_seconds):.2f} s): {built / consumed:.0f}x", flush=True)


if __name__ == "__main__":
    main()

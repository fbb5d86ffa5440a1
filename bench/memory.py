"""The memory plan against what runs use: finetune_generation.py and predict_generation.py as a user runs them,
each in a fresh process, over a grid of shapes (layers, hidden size, batch x length, recompute, LoRA, beams)
of a GLM with the real vocabulary size (50048) and random weights. Prints, per run, the estimated peak, the
measured peak resident memory (what the run records in train_results.json, or predict's closing line),
Paddle's allocator peak (tensors alone) and the errors, then the largest error.

    python bench/memory.py                 # the whole grid (about 40 min on 2 cores)
    python bench/memory.py --only 1,4      # some rows
    python bench/memory.py --recompute-saving   # a 12-layer hidden-1024 run with and without --recompute

Rows are written with the tiny default's tokenizer; every source and target is long enough to fill its
length, so every batch is as long as the plan assumes. Not a test: figures only (tests/test_memory.py
checks a few small shapes with a wider margin).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import describe_machine  # noqa: E402

TOKENIZER = os.path.join(ROOT, "configs", "glm-tiny-chinese")
TOKENIZER_FILES = ("cog-pretrain.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
VOCAB = 50048

# (layers, hidden, batch, src_length, tgt_length, recompute, lora)
TRAINING = [
    (2, 128, 8, 128, 64, False, False),
    (4, 256, 8, 256, 128, False, False),
    (4, 256, 8, 256, 128, True, False),
    (12, 512, 4, 256, 128, False, False),
    (12, 512, 4, 256, 128, True, False),
    (24, 512, 2, 256, 64, False, False),
    (6, 512, 4, 256, 128, False, True),
    (6, 512, 4, 256, 128, True, True),
    (12, 1024, 4, 384, 128, False, False),
    (12, 1024, 4, 384, 128, True, False),
]
# (layers, hidden, batch, src_length, tgt_length, beams)
DECODING = [
    (12, 512, 4, 256, 64, 4),
    (4, 1024, 8, 384, 64, 1),
    (24, 1024, 2, 256, 32, 5),
]


def model_dir(work, layers, hidden, weights):
    """A GLM directory: config.json and the tiny default's tokenizer; random weights saved when an adapter
    needs them (LoRA refuses a base without weights)."""
    path = os.path.join(work, f"glm-{layers}x{hidden}" + ("-weights" if weights else ""))
    if os.path.isdir(path):
        return path
    os.makedirs(path)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(TOKENIZER, name), path)
    config = {"num_layers": layers, "hidden_size": hidden, "num_attention_heads": max(1, hidden // 64),
              "vocab_size": VOCAB, "max_sequence_length": 1024, "output_predict": True,
              "block_position_encoding": True, "architectures": ["GLMForConditionalGeneration"]}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    if weights:
        code = ("import sys, paddle, glm; paddle.seed(0); "
                f"glm.GLMForConditionalGeneration(glm.GLMConfig.from_pretrained({path!r})).save_pretrained({path!r})")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return path


def data_dir(work):
    """Rows whose source and target fill any length used here: demo ad copy, many rows joined."""
    path = os.path.join(work, "data")
    if os.path.isdir(path):
        return path
    os.makedirs(path)
    with open(os.path.join(ROOT, "demo_data", "train.json"), encoding="utf-8") as f:
        summaries = [json.loads(line)["summary"] for line in f if line.strip()]
    for split, count in (("train", 64), ("dev", 32)):
        with open(os.path.join(path, f"{split}.json"), "w", encoding="utf-8") as f:
            for row in range(count):
                pick = summaries[row * 7 % len(summaries):][:40] or summaries[:40]
                f.write(json.dumps({"src": "".join(pick[:30]), "tgt": "".join(pick[30:])}, ensure_ascii=False) + "\n")
    return path


def run(command):
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return result.stderr


def train(work, layers, hidden, batch, src, tgt, recompute, lora):
    model = model_dir(work, layers, hidden, weights=lora)
    output = os.path.join(work, "out")
    command = ["finetune_generation.py", "--model_name_or_path", model, "--dataset_name_or_path", data_dir(work),
               "--output_dir", output, "--overwrite_output_dir", "--src_length", str(src), "--tgt_length", str(tgt), "--min_tgt_length", "0",
               "--per_device_train_batch_size", str(batch), "--max_steps", "3", "--do_train", "--do_eval", "false",
               "--recompute", str(recompute).lower(), "--lora", str(lora).lower(), "--save_steps", "1000",
               "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none", "--warmup_steps", "0",
               "--learning_rate", "1e-4", "--device", "cpu"]  # fmt: skip
    run(command)
    with open(os.path.join(output, "train_results.json"), encoding="utf-8") as f:
        results = json.load(f)
    shutil.rmtree(output)
    return results["estimated_peak_memory_mib"], results["peak_memory_mib"], results["peak_tensor_memory_mib"]


def decode(work, layers, hidden, batch, src, tgt, beams):
    model = model_dir(work, layers, hidden, weights=False)
    output = os.path.join(work, "predictions.jsonl")
    if os.path.exists(output):
        os.unlink(output)
    command = ["predict_generation.py", "--model_name_or_path", model, "--data_file",
               os.path.join(data_dir(work), "dev.json"), "--output_file", output, "--src_length", str(src),
               "--tgt_length", str(tgt), "--min_tgt_length", str(tgt), "--num_beams", str(beams),
               "--decode_strategy", "beam_search" if beams > 1 else "greedy_search", "--batch_size", str(batch),
               "--length_penalty", "1.0", "--no_repeat_ngram_size", "0"]  # fmt: skip
    stderr = run(command)
    line = [line for line in stderr.splitlines() if line.startswith("Memory: peak")][-1]
    measured, estimated, tensors = (float(x) * 1024 for x in re.findall(r"([\d.]+) GiB", line))
    return estimated, measured, tensors


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated row numbers (as printed)")
    parser.add_argument("--recompute-saving", action="store_true", help="only the 12-layer recompute comparison")
    parser.add_argument("--work_dir", help="where the model directories go (default: a temporary directory)")
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="glm-memory-")
    os.makedirs(work, exist_ok=True)
    print(describe_machine(), flush=True)
    rows = [("train", row) for row in TRAINING] + [("predict", row) for row in DECODING]
    if args.recompute_saving:
        rows = [("train", (12, 1024, 4, 384, 128, False, False)), ("train", (12, 1024, 4, 384, 128, True, False))]
    wanted = {int(n) for n in args.only.split(",")} if args.only else None
    print(f"{'#':>2} {'run':<58} {'estimated':>10} {'measured':>10} {'error':>7}   {'tensors':>9}", flush=True)
    worst = 0.0
    for number, (kind, row) in enumerate(rows, start=1):
        if wanted and number not in wanted:
            continue
        if kind == "train":
            layers, hidden, batch, src, tgt, recompute, lora = row
            name = (f"train {layers}L h{hidden} {batch}x{src}+{tgt}" + (" recompute" if recompute else "")
                    + (" LoRA" if lora else ""))
            estimated, measured, tensors = train(work, *row)
        else:
            layers, hidden, batch, src, tgt, beams = row
            name = f"predict {layers}L h{hidden} {batch} sources {src}+{tgt}, {beams} beams"
            estimated, measured, tensors = decode(work, *row)
        error = (estimated - measured) / measured
        worst = max(worst, abs(error))
        print(f"{number:>2} {name:<58} {estimated:>8.0f}Mi {measured:>8.0f}Mi {100 * error:>+6.1f}%   "
              f"{tensors:>7.0f}Mi", flush=True)
    print(f"largest error {100 * worst:.1f} % (estimated vs the measured peak resident memory)", flush=True)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

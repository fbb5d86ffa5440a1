"""The ways to adapt one GLM base, side by side on real data (issue 27's table): full finetuning, LoRA,
P-tuning v2 (--prefix_tuning) and THUDM's P-tuning (--ptuning, backbone frozen), from the same base with
the same seed and steps:

  1. sentiment as a cloze (finetune_cloze.py, configs/real-sentiment-cloze-500.json): the first
     --sentiment_rows rows of ../shared/data/sentiment/train.jsonl, dev accuracy on its 1000 dev rows;
  2. generation (finetune_generation.py): AdvertiseGen's ../shared rows (content -> summary), ROUGE-L on the
     dev rows by beam search (THUDM's P-tuning is for cloze patterns only, so it has no generation row).

Each method's learning rate is its own (--learning_rates), as each is usually run; everything else is the
recipe's; `--learning_rates prefix=1e-2/3e-2` runs a method at several (OUT/cloze-METHOD-lrRATE). Reported per run: the dev score, trainable parameters, seconds per training step and the peak
memory of the training process (RSS on a CPU), from its train_results.json; and the dev loss.

    python tools/adaptation_on_real_data.py --base BASE --output_dir OUT

BASE: a GLM checkpoint directory with weights and the real GLM Chinese tokenizer, e.g. the model
tools/pretraining_on_real_data.py pretrains (OUT/pretrained-reviews). A finished run is skipped, so a killed
comparison continues; OUT/adaptation.json holds the table, which is printed as markdown.
"""

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from understanding_on_real_data import SHARED, python, sentiment_rows, write_jsonl  # noqa: E402

METHODS = {  # name: (label, flags; the cloze task's own flags first)
    "full": ("full finetuning", []),
    "lora": ("LoRA (rank 8, query_key_value and attention.dense)", ["--lora", "true"]),
    "prefix": ("P-tuning v2 (16 prefix tokens, projection)", ["--prefix_tuning", "true", "--num_prefix_tokens", "16",
                                                              "--prefix_projection", "true"]),
    "ptuning": ("THUDM's P-tuning (8 prompt tokens, LSTM, backbone frozen)", ["--ptuning", "true", "--num_prompt_tokens", "8",
                                                                              "--prompt_encoder", "lstm", "--freeze_backbone", "true"]),
}  # fmt: skip
DEFAULT_RATES = "full=3e-3,lora=1e-2,prefix=1e-2,ptuning=1e-2"


def run_once(script, output, flags):
    """`script` with `flags` into `output`, unless a finished run is there; its train and eval results."""
    if not os.path.exists(os.path.join(output, "run_record.json")) or not os.path.exists(os.path.join(output, "eval_results.json")):
        python(script, *flags, "--output_dir", output, "--disable_tqdm", "true")
    results = {}
    for split in ("train", "eval"):
        with open(os.path.join(output, f"{split}_results.json"), encoding="utf-8") as f:
            results.update(json.load(f))
    with open(os.path.join(output, "trainer_state.json"), encoding="utf-8") as f:
        results["steps"] = json.load(f)["global_step"]
    return results


def runs(methods, rates):
    """(method, learning rate) of every run, in order: each method at each of its rates."""
    return [(method, rate) for method in methods for rate in rates[method]]


def row(task, method, rate, results, score_name, score):
    return {
        "task": task, "method": METHODS[method][0], "learning_rate": rate, score_name: round(score, 2),
        "eval_loss": round(results["eval_loss"], 3),
        "trainable_parameters": results.get("trainable_parameters"), "steps": results["steps"],
        "seconds_per_step": round(results["train_runtime"] / max(results["steps"], 1), 3),
        "peak_memory_mib": results.get("peak_memory_mib"),
    }


def sentiment(args, rates):
    data = os.path.join(args.output_dir, f"sentiment-{args.sentiment_rows}")
    if not os.path.exists(os.path.join(data, "dev.json")):
        write_jsonl(os.path.join(data, "train.json"), sentiment_rows("train", args.sentiment_rows))
        write_jsonl(os.path.join(data, "dev.json"), sentiment_rows("dev"))
    rows = []
    for method, rate in runs(args.methods, rates):
        flags = [os.path.join("configs", "real-sentiment-cloze-500.json"), "--model_name_or_path", args.base,
                 "--dataset_name_or_path", data, "--learning_rate", str(rate), "--seed", str(args.seed),
                 "--evaluation_strategy", "no", "--save_strategy", "no", *METHODS[method][1]]  # fmt: skip
        results = run_once("finetune_cloze.py", os.path.join(args.output_dir, f"cloze-{method}-lr{rate:g}"), flags)
        rows.append(row("sentiment cloze", method, rate, results, "dev_accuracy", results["eval_accuracy"]))
    return rows


def advertisegen(args, rates):
    data = os.path.join(args.output_dir, "advertisegen")
    if not os.path.exists(os.path.join(data, "dev.json")):
        for split in ("train", "dev"):
            with open(os.path.join(SHARED, "data", "advertisegen", f"{split}.jsonl"), encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip()]
            write_jsonl(os.path.join(data, f"{split}.json"), lines)
    rows = []
    for method, rate in runs([m for m in args.methods if m != "ptuning"], rates):
        flags = ["--model_name_or_path", args.base, "--dataset_name_or_path", data, "--src_length", "64",
                 "--tgt_length", "128", "--min_tgt_length", "0", "--num_beams", "3", "--no_repeat_ngram_size", "3",
                 "--num_train_epochs", str(args.generation_epochs), "--per_device_train_batch_size", "16",
                 "--per_device_eval_batch_size", "32", "--learning_rate", str(rate), "--warmup_ratio", "0.06",
                 "--lr_scheduler_type", "linear", "--logging_steps", "10", "--seed", str(args.seed), "--do_train", "true",
                 "--do_eval", "true", "--evaluation_strategy", "no", "--save_strategy", "no", "--device", "cpu",
                 "--max_eval_samples", str(args.generation_dev_rows), *METHODS[method][1]]  # fmt: skip
        results = run_once("finetune_generation.py", os.path.join(args.output_dir, f"generation-{method}-lr{rate:g}"), flags)
        rows.append(row("AdvertiseGen generation", method, rate, results, "rouge_l", results["eval_rougeL"]))
    return rows


def markdown(rows):
    lines = ["| task | method | lr | dev score | dev loss | trainable parameters | s / step | peak memory |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        score = f"{r['dev_accuracy']} % accuracy" if "dev_accuracy" in r else f"ROUGE-L {r['rouge_l']}"
        lines.append(f"| {r['task']} | {r['method']} | {r['learning_rate']:g} | {score} | {r['eval_loss']} | {r['trainable_parameters']:,} | "
                     f"{r['seconds_per_step']} | {r['peak_memory_mib']:.0f} MiB |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="GLM checkpoint directory with weights and the real tokenizer")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"some of {', '.join(METHODS)}")
    parser.add_argument("--learning_rates", default=DEFAULT_RATES, help="method=rate[/rate...], ... (several: one run each)")
    parser.add_argument("--sentiment_rows", type=int, default=500)
    parser.add_argument("--generation_epochs", type=float, default=2)
    parser.add_argument("--generation_dev_rows", type=int, default=200)
    parser.add_argument("--tasks", default="sentiment,advertisegen")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown[0]} (known: {', '.join(METHODS)})")
    if not os.path.isfile(os.path.join(args.base, "model_state.pdparams")):
        parser.error(f"--base {args.base}: no model_state.pdparams (a checkpoint with weights is needed: the frozen "
                     "methods adapt it)")
    rates = dict(item.split("=") for item in args.learning_rates.split(","))
    rates = {name: [float(value) for value in values.split("/")] for name, values in rates.items()}
    os.makedirs(args.output_dir, exist_ok=True)
    rows = []
    tasks = args.tasks.split(",")
    if "sentiment" in tasks:
        rows += sentiment(args, rates)
    if "advertisegen" in tasks:
        rows += advertisegen(args, rates)
    summary = {"base": os.path.abspath(args.base), "machine": platform.processor() or platform.machine(),
               "threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}  # fmt: skip
    with open(os.path.join(args.output_dir, "adaptation.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    print(markdown(rows))


if __name__ == "__main__":
    main()

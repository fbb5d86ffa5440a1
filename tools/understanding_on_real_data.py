"""Real-data check of the understanding tasks: a random-init small GLM with the real GLM Chinese tokenizer
(../shared; no pretrained weights exist here, and none are committed) learns

  1. sentiment as a cloze (finetune_cloze.py): the first --sentiment_rows rows of
     ../shared/data/sentiment/train.jsonl as "{review} 总的来说，这是一条[MASK]评价。" with choices
     正面/负面, dev accuracy reported before training and after every epoch;
  2. People's Daily language modelling: `evaluate.py --task lm` perplexity (and lambada accuracy) on the
     last --heldout_lines lines of text.txt / words.txt, before and after a short finetune
     (finetune_generation.py, [MASK] blank: a line's first character is the source, the rest the target)
     on its first --lm_lines lines.

    python tools/understanding_on_real_data.py --output_dir /tmp/understanding

Prints a JSON summary (accuracy per epoch, minutes, step counts, perplexities) and writes it to
OUTPUT_DIR/summary.json. Each stage runs the project's own entry scripts in a subprocess.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
TEMPLATE = "{text} 总的来说，这是一条[MASK]评价。"
CHOICES = ["正面", "负面"]


def python(*args):
    print("$ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def build_model_dir(path, hidden_size, num_layers, max_sequence_length):
    """The real tokenizer saved the PaddleNLP way and a small GLM's seeded random weights: every stage
    (and the "before" evaluation) starts from the same model."""
    sys.path.insert(0, ROOT)
    import paddle
    from paddlenlp.transformers import GLMChineseTokenizer

    from glm import GLMConfig, GLMForConditionalGeneration

    source = os.path.join(path, "sentencepiece")
    os.makedirs(source, exist_ok=True)
    shutil.copy(os.path.join(SHARED, "tokenizers", "glm-chinese", "cog-pretrain.model"), source)
    GLMChineseTokenizer.from_pretrained(source).save_pretrained(path)
    shutil.rmtree(source)
    config = GLMConfig(
        num_layers=num_layers, vocab_size=50048, hidden_size=hidden_size, num_attention_heads=4,
        max_sequence_length=max_sequence_length, embedding_dropout_prob=0.1, attention_dropout_prob=0.1,
        output_dropout_prob=0.1,
    )  # fmt: skip
    paddle.seed(42)
    GLMForConditionalGeneration(config).save_pretrained(path)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def finetune(script, recipe, model_dir, data, output):
    """Runs a finetuning script on a recipe; its wall-clock minutes and final trainer state."""
    start = time.time()
    python(
        script, os.path.join("configs", recipe), "--model_name_or_path", model_dir, "--dataset_name_or_path", data,
        "--output_dir", output, "--overwrite_output_dir", "--disable_tqdm", "true",
    )  # fmt: skip
    with open(os.path.join(output, "trainer_state.json"), encoding="utf-8") as f:
        return (time.time() - start) / 60, json.load(f)


def sentiment_rows(split, count=None):
    with open(os.path.join(SHARED, "data", "sentiment", f"{split}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][:count]
    return [
        {"inputs_pretokenized": TEMPLATE.format(text=r["text"]), "choices_pretokenized": CHOICES, "label": CHOICES.index(r["label"])}
        for r in rows
    ]


def sentiment(args, model_dir):
    data = os.path.join(args.output_dir, "sentiment")
    write_jsonl(os.path.join(data, "train.json"), sentiment_rows("train", args.sentiment_rows))
    write_jsonl(os.path.join(data, "dev.json"), sentiment_rows("dev"))
    output = os.path.join(args.output_dir, "sentiment-cloze")
    minutes, state = finetune("finetune_cloze.py", "real-sentiment-cloze.json", model_dir, data, output)
    with open(os.path.join(output, "untrained_results.json"), encoding="utf-8") as f:
        untrained = json.load(f)["untrained_accuracy"]
    curve = [{"epoch": 0, "step": 0, "accuracy": untrained}] + [
        {"epoch": e["progress_or_epoch"], "step": e["step"], "accuracy": e["eval_accuracy"]}
        for e in state["log_history"] if "eval_accuracy" in e
    ]  # fmt: skip
    return {"dev_accuracy_per_epoch": curve, "minutes_total": round(minutes, 2), "train_steps": state["global_step"],
            "train_rows": args.sentiment_rows, "dev_rows": 1000}  # fmt: skip


def evaluate_lm(model_dir, text_file, words_file, output_file):
    python("evaluate.py", "--task", "lm", "--model_name_or_path", model_dir, "--data_file", text_file,
           "--seq_length", "128", "--overlapping_eval", "32", "--batch_size", "16", "--output_file", output_file)
    python("evaluate.py", "--task", "lambada", "--model_name_or_path", model_dir, "--data_file", words_file,
           "--batch_size", "16", "--output_file", output_file + ".lambada.json")  # fmt: skip
    with open(output_file, encoding="utf-8") as f, open(output_file + ".lambada.json", encoding="utf-8") as g:
        return dict(json.load(f), lambada_accuracy=json.load(g)["accuracy"])


def peoples_daily(args, model_dir):
    with open(os.path.join(SHARED, "data", "peoples-daily-1998", "text.txt"), encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    with open(os.path.join(SHARED, "data", "peoples-daily-1998", "words.txt"), encoding="utf-8") as f:
        words = [line.strip() for line in f]
    keep = [i for i, line in enumerate(lines) if len(line) >= 12 and len(words[i].split()) >= 3]
    train, heldout = keep[: args.lm_lines], keep[-args.heldout_lines :]
    data = os.path.join(args.output_dir, "peoples-daily")
    os.makedirs(data, exist_ok=True)
    text_file, words_file = os.path.join(data, "heldout.txt"), os.path.join(data, "heldout-words.txt")
    with open(text_file, "w", encoding="utf-8") as f:
        f.writelines(lines[i] + "\n" for i in heldout)
    with open(words_file, "w", encoding="utf-8") as f:
        f.writelines(words[i] + "\n" for i in heldout)
    # The source is a line's first character, as evaluation's first window prompts with its first token.
    split = [{"src": lines[i][:1], "tgt": lines[i][1:]} for i in train]
    write_jsonl(os.path.join(data, "train.json"), split[: -100])
    write_jsonl(os.path.join(data, "dev.json"), split[-100:])

    before = evaluate_lm(model_dir, text_file, words_file, os.path.join(data, "before.json"))
    output = os.path.join(args.output_dir, "peoples-daily-lm")
    minutes, state = finetune("finetune_generation.py", "real-peoples-daily-lm.json", model_dir, data, output)
    after = evaluate_lm(output, text_file, words_file, os.path.join(data, "after.json"))
    return {"before": before, "after": after, "finetune_minutes": round(minutes, 2), "train_steps": state["global_step"],
            "train_lines": len(split) - 100, "heldout_lines": len(heldout)}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--sentiment_rows", type=int, default=4000)
    parser.add_argument("--lm_lines", type=int, default=3000)
    parser.add_argument("--heldout_lines", type=int, default=300)
    parser.add_argument("--only", choices=["sentiment", "lm"], default=None)
    args = parser.parse_args(argv)
    model_dir = os.path.join(args.output_dir, "glm-small-real-tokenizer")
    build_model_dir(model_dir, hidden_size=128, num_layers=2, max_sequence_length=256)
    summary = {}
    if args.only in (None, "sentiment"):
        summary["sentiment"] = sentiment(args, model_dir)
    if args.only in (None, "lm"):
        summary["peoples_daily"] = peoples_daily(args, model_dir)
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=2)
    print(json.dumps(summary, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()

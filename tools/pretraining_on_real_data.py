"""Real-data check of pretraining: a small GLM pretrained from scratch with the real GLM Chinese tokenizer
(../shared) on People's Daily and the unlabeled review texts of the sentiment training split, against the
random-init model of the same shape (the weights pretraining starts from):

  1. held-out blank-infilling loss per objective (pretrain_glm.py's evaluation on 5 % of People's Daily's
     lines, held out: every 20th line);
  2. `evaluate.py --task lm` and `--task lambada` on held-out People's Daily lines (words.txt);
  3. single masked words: in held-out lines one PKU word (with a Chinese character) becomes [MASK];
     the share `predict_generation.py` fills exactly (greedy);
  4. downstream: finetune_cloze.py on 500 labeled sentiment rows, the same steps and seed from either
     model, accuracy on the 1000 dev rows (never seen in pretraining).

    python tools/pretraining_on_real_data.py --output_dir /tmp/pretraining

Each stage runs the project's entry scripts in a subprocess and is skipped when its output exists, so a
killed run continues where it stopped (pretraining resumes from its newest checkpoint). Prints a JSON
summary and writes it to OUTPUT_DIR/summary.json.
"""

import argparse
import json
import os
import random
import sys
import time
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from understanding_on_real_data import SHARED, build_model_dir, evaluate_lm, finetune, python, sentiment_rows, write_jsonl  # noqa: E402

HELD_OUT_EVERY = 20  # every 20th line of People's Daily: 5 % held out


def has_chinese(word: str) -> bool:
    return any("\u4e00" <= character <= "\u9fff" for character in word)


def split_data(data):
    """People's Daily's lines (text and PKU words) split 95/5; the sentiment training texts, unlabeled."""
    with open(os.path.join(SHARED, "data", "peoples-daily-1998", "text.txt"), encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    with open(os.path.join(SHARED, "data", "peoples-daily-1998", "words.txt"), encoding="utf-8") as f:
        words = [line.strip() for line in f]
    kept = [i for i, line in enumerate(lines) if line]
    held_out = [i for number, i in enumerate(kept) if number % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = sorted(set(kept) - set(held_out))
    os.makedirs(data, exist_ok=True)
    for name, indices, source in (("pd-train.txt", train, lines), ("pd-heldout.txt", held_out, lines),
                                  ("pd-heldout-words.txt", held_out, words)):
        with open(os.path.join(data, name), "w", encoding="utf-8") as f:
            f.writelines(source[i] + "\n" for i in indices)
    with open(os.path.join(SHARED, "data", "sentiment", "train.jsonl"), encoding="utf-8") as f:
        reviews = [{"text": json.loads(line)["text"]} for line in f if line.strip()]
    write_jsonl(os.path.join(data, "reviews.jsonl"), reviews)
    return {"peoples_daily_train_lines": len(train), "peoples_daily_heldout_lines": len(held_out), "reviews": len(reviews)}


def lambada_words(line: str):
    """The PKU words of a line up to its last word that holds a Chinese character."""
    words = line.split()
    while words and not has_chinese(words[-1]):
        words.pop()
    return words


def masked_word_rows(words_file, count, seed=0):
    """Held-out lines with one word (holding a Chinese character) replaced by [MASK]: {"src", "answer"}."""
    rng, rows = random.Random(seed), []
    with open(words_file, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            candidates = [i for i, word in enumerate(words) if has_chinese(word)]
            if len(words) < 5 or not candidates:
                continue
            pick = rng.choice(candidates)
            rows.append({"src": "".join(words[:pick]) + "[MASK]" + "".join(words[pick + 1:]), "answer": words[pick]})
            if len(rows) == count:
                break
    return rows


def evaluated_lm(model_dir, text_file, words_file, output_file):
    """`evaluate.py --task lm` and `--task lambada` (understanding_on_real_data.evaluate_lm), unless done."""
    if not (os.path.exists(output_file) and os.path.exists(output_file + ".lambada.json")):
        return evaluate_lm(model_dir, text_file, words_file, output_file)
    with open(output_file, encoding="utf-8") as f, open(output_file + ".lambada.json", encoding="utf-8") as g:
        return dict(json.load(f), lambada_accuracy=json.load(g)["accuracy"])


def fill_masked_words(model_dir, rows_file, output_file):
    """predict_generation.py, greedy, on the masked lines; the share filled exactly (NFKC: the tokenizer's form)."""
    if not os.path.exists(output_file):
        python("predict_generation.py", "--model_name_or_path", model_dir, "--data_file", rows_file, "--output_file",
               output_file, "--src_length", "200", "--tgt_length", "12", "--min_tgt_length", "0",
               "--decode_strategy", "greedy_search", "--num_beams", "1", "--batch_size", "16")  # fmt: skip
    with open(output_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    exact = [unicodedata.normalize("NFKC", r["prediction"]).strip() == unicodedata.normalize("NFKC", r["answer"]) for r in rows]
    return {"exact": round(100 * sum(exact) / len(rows), 2), "rows": len(rows),
            "examples": [{"src": r["src"], "answer": r["answer"], "prediction": r["prediction"]} for r in rows[:8]]}


def pretrain(args, model_dir, corpora):
    output = os.path.join(args.output_dir, "pretrained")
    started = time.time()
    if not os.path.exists(os.path.join(output, "eval_results.json")):
        python("pretrain_glm.py", os.path.join("configs", "real-pretrain.json"), "--model_name_or_path", model_dir,
               "--corpus_dir", corpora["train"], "--eval_corpus_dir", corpora["heldout"], "--output_dir", output,
               "--max_steps", str(args.max_steps), "--per_device_train_batch_size", str(args.batch_size),
               "--learning_rate", str(args.learning_rate), "--disable_tqdm", "true")  # fmt: skip
    results = {}
    for name in ("untrained", "eval"):
        with open(os.path.join(output, f"{name}_results.json"), encoding="utf-8") as f:
            results[name] = {k[len(name) + 1:]: round(v, 4) for k, v in json.load(f).items() if k.startswith(f"{name}_loss")}
    with open(os.path.join(output, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    return output, {"heldout_loss_random_init": results["untrained"], "heldout_loss_pretrained": results["eval"],
                    "steps": state["global_step"], "minutes_this_invocation": round((time.time() - started) / 60, 1)}


def sentiment_downstream(args, model_dir, name):
    data = os.path.join(args.output_dir, "sentiment-500")
    if not os.path.exists(os.path.join(data, "dev.json")):
        write_jsonl(os.path.join(data, "train.json"), sentiment_rows("train", args.sentiment_rows))
        write_jsonl(os.path.join(data, "dev.json"), sentiment_rows("dev"))
    output = os.path.join(args.output_dir, f"cloze-{name}")
    if os.path.exists(os.path.join(output, "eval_results.json")):
        minutes = None
    else:
        minutes, _ = finetune("finetune_cloze.py", "real-sentiment-cloze-500.json", model_dir, data, output)
    with open(os.path.join(output, "eval_results.json"), encoding="utf-8") as f:
        accuracy = json.load(f)["eval_accuracy"]
    with open(os.path.join(output, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    per_epoch = [round(e["eval_accuracy"], 2) for e in state["log_history"] if "eval_accuracy" in e]
    return {"dev_accuracy": round(accuracy, 2), "per_epoch": per_epoch, "steps": state["global_step"],
            "minutes": minutes and round(minutes, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=800, help="pretraining steps")
    parser.add_argument("--batch_size", type=int, default=8, help="pretraining windows (of 128 tokens) per step")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="pretraining peak learning rate")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--heldout_lines", type=int, default=300, help="held-out lines for lm, lambada, masked words")
    parser.add_argument("--sentiment_rows", type=int, default=500)
    args = parser.parse_args(argv)
    started, summary = time.time(), {"machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"}
    data = os.path.join(args.output_dir, "data")
    summary["data"] = split_data(data)
    model_dir = os.path.join(args.output_dir, "glm-small-random")
    if not os.path.exists(os.path.join(model_dir, "model_state.pdparams")):
        build_model_dir(model_dir, hidden_size=args.hidden_size, num_layers=args.layers, max_sequence_length=256)
    corpora = {"train": os.path.join(args.output_dir, "corpus-train"), "heldout": os.path.join(args.output_dir, "corpus-heldout")}
    for name, inputs in (("train", ["pd-train.txt", "reviews.jsonl"]), ("heldout", ["pd-heldout.txt"])):
        if not os.path.exists(corpora[name]):
            python(os.path.join("tools", "prepare_pretraining_data.py"), "--input", *[os.path.join(data, i) for i in inputs],
                   "--output_dir", corpora[name], "--model_name_or_path", model_dir)
    pretrained, summary["pretraining"] = pretrain(args, model_dir, corpora)

    # Evaluation files: the first --heldout_lines held-out lines of 3 words or more. For LAMBADA a line
    # ends at its last word holding a Chinese character (a final 。 would be a trivial answer).
    text_file, words_file = os.path.join(data, "eval-text.txt"), os.path.join(data, "eval-words.txt")
    with open(os.path.join(data, "pd-heldout.txt"), encoding="utf-8") as f, \
            open(os.path.join(data, "pd-heldout-words.txt"), encoding="utf-8") as g:
        pairs = [(text, lambada_words(words)) for text, words in zip(f.read().splitlines(), g.read().splitlines())]
    pairs = [(text, words) for text, words in pairs if len(words) >= 3][: args.heldout_lines]
    with open(text_file, "w", encoding="utf-8") as f, open(words_file, "w", encoding="utf-8") as g:
        f.writelines(text + "\n" for text, _ in pairs)
        g.writelines(" ".join(words) + "\n" for _, words in pairs)
    masked = os.path.join(data, "masked-words.jsonl")
    write_jsonl(masked, masked_word_rows(words_file, args.heldout_lines))
    for name, model in (("random_init", model_dir), ("pretrained", pretrained)):
        results = evaluated_lm(model, text_file, words_file, os.path.join(args.output_dir, f"lm-{name}.json"))
        summary[f"lm_{name}"] = {k: round(v, 4) for k, v in results.items() if k in ("perplexity", "loss", "tokens", "lambada_accuracy")}
        summary[f"masked_words_{name}"] = fill_masked_words(model, masked, os.path.join(args.output_dir, f"masked-{name}.jsonl"))
    for name, model in (("random_init", model_dir), ("pretrained", pretrained)):
        summary[f"sentiment_500_{name}"] = sentiment_downstream(args, model, name)
    summary["minutes_total_this_invocation"] = round((time.time() - started) / 60, 1)
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=2)
    print(json.dumps(summary, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()

"""Real-data check of pretraining: a small GLM pretrained from scratch with the real GLM Chinese tokenizer
(../shared) against the random-init model of the same shape (the weights pretraining starts from), on
one of two corpora (--corpus):

  mixture  People's Daily (every 20th line held out) and the unlabeled review texts of the sentiment
           training split; held-out loss on the held-out People's Daily lines;
  reviews  the review texts of the sentiment training split alone (in-domain), every 20th held out for
           the held-out loss; never a dev row.

  1. held-out blank-infilling loss per objective (pretrain_glm.py's evaluation), at every saved step;
  2. (--heldout_evaluation true) `evaluate.py --task lm` and `--task lambada` on held-out People's Daily
     lines (words.txt), and single masked words: in held-out lines one PKU word (with a Chinese
     character) becomes [MASK]; the share `predict_generation.py` fills exactly (greedy);
  3. downstream: finetune_cloze.py (configs/real-sentiment-cloze-500.json: 500 labeled sentiment rows,
     5 epochs, 80 steps) from the random init and from the pretrained model at each of --curve_steps
     (one pretraining run: checkpoint-N of the run, saved every gcd(--curve_steps) steps, is the model at
     step N of the full run's schedule, not a shorter run decayed to its end), accuracy on the 1000 dev
     rows (never seen in pretraining): zero-shot (--do_train false), then each --finetune_learning_rates
     (--random_init_learning_rates for the random init, if given) on the first of --finetune_seeds, then the other seeds at each model's best rate (the random init
     and the final model first, then the other curve steps). To save time the
     finetuning evaluates and saves only at its end (--eval_steps 1000000 --save_strategy no; the final
     model is still saved), unless --eval_every_epoch true.

    python tools/pretraining_on_real_data.py --output_dir /tmp/pretraining --corpus reviews \
        --max_steps 1500 --learning_rate 0.002 --curve_steps 300,800,1500 \
        --finetune_learning_rates 3e-4,1e-3 --finetune_seeds 1,2,3 --heldout_evaluation false

Each stage runs the project's entry scripts in a subprocess and is skipped when its output exists, so a
killed run continues where it stopped (pretraining resumes from its newest checkpoint), and a rerun with
more rates, seeds or curve steps (of the saved ones) runs only what is new; random-init finetunes are
shared by both corpora in one --output_dir. Prints a JSON summary (OUTPUT_DIR/summary-CORPUS.json) and
the downstream table of every finetune measured in OUTPUT_DIR by this and earlier invocations (dev
accuracy per model, pretraining steps, rate and seed, and the mean over seeds; OUTPUT_DIR/downstream.json).
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from understanding_on_real_data import SHARED, build_model_dir, evaluate_lm, python, sentiment_rows, write_jsonl  # noqa: E402

HELD_OUT_EVERY = 20  # every 20th line of People's Daily (or review, --corpus reviews): 5 % held out
CORPORA = {  # --corpus: (training files, held-out files) of split_data
    "mixture": (["pd-train.txt", "reviews.jsonl"], ["pd-heldout.txt"]),
    "reviews": (["reviews-train.jsonl"], ["reviews-heldout.jsonl"]),
}
ROW_FILE = "downstream_row.json"  # in each finetuning's directory: its line of the table


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
    reviews_held_out = reviews[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
    reviews_train = [r for number, r in enumerate(reviews) if number % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    write_jsonl(os.path.join(data, "reviews-train.jsonl"), reviews_train)
    write_jsonl(os.path.join(data, "reviews-heldout.jsonl"), reviews_held_out)
    return {"peoples_daily_train_lines": len(train), "peoples_daily_heldout_lines": len(held_out), "reviews": len(reviews),
            "reviews_train": len(reviews_train), "reviews_heldout": len(reviews_held_out)}


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


def pretraining_dir(args):
    return os.path.join(args.output_dir, "pretrained" if args.corpus == "mixture" else f"pretrained-{args.corpus}")


def pretrain(args, model_dir, corpora):
    """pretrain_glm.py on the corpus, unless done; with --curve_steps it evaluates and keeps a checkpoint
    every gcd(curve steps) steps (none rotated away)."""
    output = pretraining_dir(args)
    started = time.time()
    if not os.path.exists(os.path.join(output, "eval_results.json")):
        curve = []
        if args.curve_steps:
            every = math.gcd(*args.curve_steps)
            curve = ["--save_steps", str(every), "--save_total_limit", "100000", "--eval_steps", str(every)]
        python("pretrain_glm.py", os.path.join("configs", "real-pretrain.json"), "--model_name_or_path", model_dir,
               "--corpus_dir", corpora["train"], "--eval_corpus_dir", corpora["heldout"], "--output_dir", output,
               "--max_steps", str(args.max_steps), "--per_device_train_batch_size", str(args.batch_size),
               "--learning_rate", str(args.learning_rate), "--disable_tqdm", "true", *curve)  # fmt: skip
    results = {}
    for name in ("untrained", "eval"):
        with open(os.path.join(output, f"{name}_results.json"), encoding="utf-8") as f:
            results[name] = {k[len(name) + 1:]: round(v, 4) for k, v in json.load(f).items() if k.startswith(f"{name}_loss")}
    with open(os.path.join(output, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    curve = [{"step": e["step"], **{k[5:]: round(v, 4) for k, v in e.items() if k.startswith("eval_loss")}}
             for e in state["log_history"] if "eval_loss" in e]
    train_runtime = [e["train_runtime"] for e in state["log_history"] if "train_runtime" in e]
    return output, {"corpus": args.corpus, "heldout_loss_random_init": results["untrained"],
                    "heldout_loss_pretrained": results["eval"], "heldout_loss_curve": curve,
                    "steps": state["global_step"], "learning_rate": args.learning_rate,
                    "train_minutes": train_runtime and round(train_runtime[-1] / 60, 1),
                    "minutes_this_invocation": round((time.time() - started) / 60, 1)}


def curve_model(pretrained, step, max_steps):
    """The pretrained model at `step`: the final model, or checkpoint-N of the run exported as a model
    directory (its weights and config; the tokenizer and settings files of the final model)."""
    if step == max_steps:
        return pretrained
    checkpoint = os.path.join(pretrained, f"checkpoint-{step}")
    exported = f"{pretrained}-step{step}"
    if not os.path.exists(os.path.join(exported, "model_state.pdparams")):
        if not os.path.isdir(checkpoint):
            raise SystemExit(f"--curve_steps {step}: {checkpoint} was not saved (rerun the pretraining with it)")
        staging = exported + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        for name in os.listdir(pretrained):
            source = os.path.join(pretrained, name)
            if os.path.isfile(source) and (name.startswith(("tokenizer", "special_tokens", "added_tokens", "sentencepiece"))
                                           or name.endswith(".model") or name.endswith("_settings.json")):
                shutil.copy(source, staging)
        for name in ("config.json", "model_state.pdparams"):
            shutil.copy(os.path.join(checkpoint, name), staging)
        os.rename(staging, exported)
    return exported


def sentiment_data(args):
    data = os.path.join(args.output_dir, "sentiment-500")
    if not os.path.exists(os.path.join(data, "dev.json")):
        write_jsonl(os.path.join(data, "train.json"), sentiment_rows("train", args.sentiment_rows))
        write_jsonl(os.path.join(data, "dev.json"), sentiment_rows("dev"))
    return data


def cloze(args, model_dir, data, output, learning_rate=None, seed=None):
    """finetune_cloze.py from `model_dir` (zero-shot: `learning_rate` None, --do_train false), unless
    `output` holds its eval_results.json: {"dev_accuracy", "minutes", "steps", "per_epoch"}."""
    started = time.time()
    if not os.path.exists(os.path.join(output, "eval_results.json")):
        flags = ["--do_train", "false"] if learning_rate is None else ["--learning_rate", str(learning_rate), "--seed", str(seed)]
        if learning_rate is not None and not args.eval_every_epoch:
            flags += ["--evaluation_strategy", "no", "--save_strategy", "no"]  # one evaluation, at the end
        python("finetune_cloze.py", os.path.join("configs", "real-sentiment-cloze-500.json"), "--model_name_or_path",
               model_dir, "--dataset_name_or_path", data, "--output_dir", output, "--overwrite_output_dir",
               "--disable_tqdm", "true", *flags)  # fmt: skip
        with open(os.path.join(output, "minutes.json"), "w", encoding="utf-8") as f:
            json.dump({"minutes": round((time.time() - started) / 60, 2)}, f)
    with open(os.path.join(output, "eval_results.json"), encoding="utf-8") as f:
        result = {"dev_accuracy": round(json.load(f)["eval_accuracy"], 2)}
    if os.path.exists(os.path.join(output, "minutes.json")):
        with open(os.path.join(output, "minutes.json"), encoding="utf-8") as f:
            result["minutes"] = json.load(f)["minutes"]
    if os.path.exists(os.path.join(output, "trainer_state.json")):
        with open(os.path.join(output, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        result["steps"] = state["global_step"]
        result["per_epoch"] = [round(e["eval_accuracy"], 2) for e in state["log_history"] if "eval_accuracy" in e]
    return result


def rate_name(learning_rate):
    return "zero-shot" if learning_rate is None else f"{learning_rate:g}"


def downstream(args, models):
    """For each (name, pretraining steps, model dir): zero-shot, every rate on the first seed, the other
    seeds at the model's best rate. Rows of the table, one per finetune."""
    data, rows = sentiment_data(args), []
    first, *others = args.finetune_seeds
    for name, steps, model_dir in models:
        tag = name if steps is None else f"{name}-{steps}"

        def run(learning_rate, seed):
            suffix = "zeroshot" if learning_rate is None else f"lr{learning_rate:g}-seed{seed}"
            output = os.path.join(args.output_dir, f"cloze-{tag}-{suffix}")
            row = {"model": name, "pretraining_steps": steps or 0, "learning_rate": rate_name(learning_rate),
                   "seed": seed, **cloze(args, model_dir, data, output, learning_rate, seed)}
            with open(os.path.join(output, ROW_FILE), "w", encoding="utf-8") as f:
                json.dump(row, f, ensure_ascii=False)
            rows.append(row)
            print("downstream: " + json.dumps(row, ensure_ascii=False), flush=True)
            return row

        if args.zero_shot:
            run(None, None)
        rates = args.random_init_learning_rates if steps is None and args.random_init_learning_rates else args.finetune_learning_rates
        swept = [run(rate, first) for rate in rates]
        best = max(swept, key=lambda row: row["dev_accuracy"])["learning_rate"]
        for seed in others:
            run(float(best), seed)
    return rows


def measured_rows(output_dir):
    """Every downstream row measured in `output_dir` (this invocation's and earlier ones', either corpus)."""
    rows = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name, ROW_FILE)
        if name.startswith("cloze-") and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                rows.append(json.load(f))
    return rows


def mean_table(rows):
    """One line per (model, pretraining steps, rate): the seeds' accuracies and their mean."""
    groups = {}
    order = lambda row: (row["model"] != "random_init", row["model"], row["pretraining_steps"],  # noqa: E731
                         row["learning_rate"] != "zero-shot", row["learning_rate"], row["seed"] or 0)
    for row in sorted(rows, key=order):
        groups.setdefault((row["model"], row["pretraining_steps"], row["learning_rate"]), []).append(row)
    table = []
    for (model, steps, rate), members in groups.items():
        accuracies = [m["dev_accuracy"] for m in members]
        table.append({"model": model, "pretraining_steps": steps, "learning_rate": rate,
                      "seeds": [m["seed"] for m in members], "dev_accuracy": accuracies,
                      "mean": round(sum(accuracies) / len(accuracies), 2)})
    return table


def print_table(table):
    print(f"{'model':<18} {'steps':>6} {'lr':>9}  {'mean':>6}  per seed")
    for line in table:
        seeds = ", ".join(f"{a:.1f} (seed {s})" if s is not None else f"{a:.1f}" for s, a in zip(line["seeds"], line["dev_accuracy"]))
        print(f"{line['model']:<18} {line['pretraining_steps']:>6} {line['learning_rate']:>9}  {line['mean']:>6.2f}  {seeds}")


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def number_list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item.strip()]


def boolean(text):
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError("true or false")
    return text.lower() == "true"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="mixture", help="pretraining text (see above)")
    parser.add_argument("--max_steps", type=int, default=800, help="pretraining steps")
    parser.add_argument("--batch_size", type=int, default=8, help="pretraining windows (of 128 tokens) per step")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="pretraining peak learning rate")
    parser.add_argument("--curve_steps", type=number_list(int), default=[],
                        help="pretraining steps finetuned downstream, e.g. 300,1000,2000 (default: --max_steps only)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--heldout_evaluation", type=boolean, default=True,
                        help="lm, lambada and masked words on held-out People's Daily lines (random init, final model)")
    parser.add_argument("--heldout_lines", type=int, default=300, help="held-out lines for lm, lambada, masked words")
    parser.add_argument("--sentiment_rows", type=int, default=500)
    parser.add_argument("--zero_shot", type=boolean, default=True, help="score each model on the dev rows untrained")
    parser.add_argument("--finetune_learning_rates", type=number_list(float), default=[1e-3],
                        help="finetuning rates, swept on the first seed")
    parser.add_argument("--random_init_learning_rates", type=number_list(float), default=[],
                        help="the random init's finetuning rates (default: --finetune_learning_rates)")
    parser.add_argument("--finetune_seeds", type=number_list(int), default=[42],
                        help="finetuning seeds: the first for the rate sweep, the others at each model's best rate")
    parser.add_argument("--eval_every_epoch", type=boolean, default=False,
                        help="finetuning evaluates (and saves) every epoch, not only at the end")
    args = parser.parse_args(argv)
    if any(step <= 0 or step > args.max_steps for step in args.curve_steps):
        parser.error("--curve_steps must lie in 1..--max_steps")
    if not args.finetune_learning_rates or not args.finetune_seeds:
        parser.error("--finetune_learning_rates and --finetune_seeds need at least one value")
    if args.curve_steps and args.max_steps not in args.curve_steps:
        args.curve_steps.append(args.max_steps)
    started = time.time()
    summary = {"machine": f"{cpu_model()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
                          f"load average {os.getloadavg()[0]:.1f} at start"}
    data = os.path.join(args.output_dir, "data")
    summary["data"] = split_data(data)
    model_dir = os.path.join(args.output_dir, "glm-small-random")
    if not os.path.exists(os.path.join(model_dir, "model_state.pdparams")):
        build_model_dir(model_dir, hidden_size=args.hidden_size, num_layers=args.layers, max_sequence_length=256)
    prefix = "corpus" if args.corpus == "mixture" else f"corpus-{args.corpus}"
    corpora = {"train": os.path.join(args.output_dir, f"{prefix}-train"), "heldout": os.path.join(args.output_dir, f"{prefix}-heldout")}
    for name, inputs in zip(("train", "heldout"), CORPORA[args.corpus]):
        if not os.path.exists(corpora[name]):
            python(os.path.join("tools", "prepare_pretraining_data.py"), "--input", *[os.path.join(data, i) for i in inputs],
                   "--output_dir", corpora[name], "--model_name_or_path", model_dir)
    pretrained, summary["pretraining"] = pretrain(args, model_dir, corpora)

    if args.heldout_evaluation:
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

    # The random init and the final model first (the comparison that matters most), then the curve.
    steps = [args.max_steps] + sorted(set(args.curve_steps) - {args.max_steps})
    models = [("random_init", None, model_dir)] + [
        (f"pretrained-{args.corpus}", step, curve_model(pretrained, step, args.max_steps)) for step in steps]
    summary["downstream"] = downstream(args, models)
    rows = measured_rows(args.output_dir)
    table = mean_table(rows)
    summary["minutes_total_this_invocation"] = round((time.time() - started) / 60, 1)
    with open(os.path.join(args.output_dir, f"summary-{args.corpus}.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=2)
    with open(os.path.join(args.output_dir, "downstream.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "mean_over_seeds": table}, f, ensure_ascii=False, indent=2)
    print(json.dumps(summary, ensure_ascii=False, indent=2))
    print_table(table)


if __name__ == "__main__":
    main()

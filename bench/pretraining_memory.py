"""Resident memory of the pretraining data path at 1x and 10x corpus size: People's Daily (../shared)
prepared once and ten times over with the real GLM Chinese tokenizer, then, in a fresh process per size,
the batches a training run would build (windows read from the memory map, examples built, collated).

    python bench/pretraining_memory.py                      # 1x and 10x, 2000 batches of 8 x 512
    python bench/pretraining_memory.py --scales 1 10 100 --batches 4000

Prints, per size, the corpus bytes and the process's resident memory before and after building the
batches, split as /proc reports it: anonymous (the process's own memory) and file-backed (pages of the
memory-mapped corpus that were read; the kernel's page cache, dropped under memory pressure). Not a test:
figures only.
"""

import argparse
import os
import shutil
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(os.path.abspath(ROOT)), "shared")


def rss():
    """{VmRSS, RssAnon, RssFile} in MiB, from /proc/self/status."""
    figures = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                figures[name] = int(value.split()[0]) / 1024
    return figures


def tokenizer_dir(work_dir):
    from paddlenlp.transformers import GLMChineseTokenizer

    path = os.path.join(work_dir, "tokenizer")
    if not os.path.isdir(path):
        source = os.path.join(work_dir, "sentencepiece")
        os.makedirs(source, exist_ok=True)
        shutil.copy(os.path.join(SHARED, "tokenizers", "glm-chinese", "cog-pretrain.model"), source)
        GLMChineseTokenizer.from_pretrained(source).save_pretrained(path)
        shutil.rmtree(source)
    return path


def prepare(work_dir, scale, tokenizer):
    from glm.pretraining.corpus import open_corpus, prepare_corpus

    path = os.path.join(work_dir, f"corpus-{scale}x")
    if not os.path.isdir(path):
        text = os.path.join(SHARED, "data", "peoples-daily-1998", "text.txt")
        prepare_corpus([text] * scale, path, tokenizer, workers=2)
    return open_corpus(path)


def child(args):
    """Build the batches of a run over one corpus; print the memory figures."""
    from glm.pretraining.corpus import open_corpus
    from glm.pretraining.dataset import BatchCollator, PretrainingDataset
    from glm.pretraining.objective import BlankInfillingBuilder, PretrainingArguments, sentence_end_table
    from glm.pretraining.windows import WindowSampler
    from glm.tokenization import load_tokenizer, special_token_ids

    tokenizer = load_tokenizer(tokenizer_dir(args.work_dir))
    ids = special_token_ids(tokenizer)
    ends = sentence_end_table(tokenizer)
    corpus = open_corpus(os.path.join(args.work_dir, f"corpus-{args.child}x"))
    objective = PretrainingArguments(seq_length=args.seq_length)
    dataset = PretrainingDataset(WindowSampler(corpus, args.seq_length, ids, ends, seed=1),
                                 args.batches * args.batch_size)
    collator = BatchCollator(BlankInfillingBuilder(objective, ids, ends), seed=1, pad_id=ids.pad)
    before = rss()
    for batch in range(args.batches):
        collator([dataset[i] for i in range(batch * args.batch_size, (batch + 1) * args.batch_size)])
    after = rss()
    corpus_mib = (os.path.getsize(os.path.join(corpus.path, "tokens.bin")) + os.path.getsize(os.path.join(corpus.path, "tokens.idx"))) / 2**20
    print(f"{args.child:>4}x  {corpus.num_tokens / 1e6:7.1f}M tokens  corpus files {corpus_mib:7.1f} MiB  |  "
          f"RSS {before['VmRSS']:6.0f} -> {after['VmRSS']:6.0f} MiB  (anonymous {before['RssAnon']:6.0f} -> "
          f"{after['RssAnon']:6.0f}, file-backed {before['RssFile']:5.0f} -> {after['RssFile']:5.0f})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/glm-pretraining-memory", help="prepared corpora are kept here")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10], help="corpus sizes, in copies of People's Daily")
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_length", type=int, default=512)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from glm.tokenization import load_tokenizer

    os.makedirs(args.work_dir, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_dir(args.work_dir))
    print(f"{args.batches} batches of {args.batch_size} x {args.seq_length} tokens per size, a fresh process each")
    for scale in args.scales:
        prepare(args.work_dir, scale, tokenizer)
        command = [sys.executable, os.path.abspath(__file__), "--child", str(scale), "--work_dir", args.work_dir,
                   "--batches", str(args.batches), "--batch_size", str(args.batch_size), "--seq_length", str(args.seq_length)]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()

"""Prepare a pretraining corpus for pretrain_glm.py: tokenize documents once into a memory-mapped token file
and document index (glm/pretraining/corpus.py).

    python tools/prepare_pretraining_data.py --input a.txt b.txt --output_dir data/corpus --model_name_or_path MODEL
    python tools/prepare_pretraining_data.py --input rows.jsonl --text_key text --output_dir ... --model_name_or_path ...

Plain text holds one document per line (--blank_line_documents: documents separated by empty lines);
.jsonl/.json files hold one JSON object a line, the text under --text_key. The output is staged in
OUTPUT_DIR.partial and renamed when complete: a killed preparation leaves nothing pretrain_glm.py accepts,
and running it again starts afresh. The same input and tokenizer give the same bytes.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from glm.bounds import COUNT, check_flag  # noqa: E402
from glm.cli.arguments import ArgumentParser, switch  # noqa: E402
from glm.cli.console import progress_bar, shown  # noqa: E402
from glm.cli.process import command  # noqa: E402
from glm.pretraining.corpus import describe_preparation, prepare_corpus  # noqa: E402
from glm.tokenization import load_tokenizer  # noqa: E402
from paddlenlp.utils.log import logger  # noqa: E402


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text or JSON Lines files, in order")
    parser.add_argument("--output_dir", required=True, help="the corpus directory to write (new or empty)")
    parser.add_argument("--model_name_or_path", required=True,
                        help="the model (or tokenizer) directory whose tokenizer pretraining will use")
    parser.add_argument("--text_key", default="text", help="JSON Lines: the field holding a document's text")
    parser.add_argument("--blank_line_documents", type=switch, nargs="?", const=True, default=False,
                        help="plain text: documents are separated by empty lines (default: one document a line)")
    parser.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))),
                        help="tokenizing processes")
    parser.add_argument("--overwrite", type=switch, nargs="?", const=True, default=False,
                        help="replace a corpus already in --output_dir")
    logger.set_level("WARNING")  # PaddleNLP's tokenizer loading lines
    with command():
        args = parser.parse_args(argv)
        check_flag("workers", args.workers, COUNT)
        tokenizer = load_tokenizer(args.model_name_or_path)
        started = time.time()
        total = sum(os.path.getsize(path) for path in args.input if os.path.isfile(path)) / 2**20
        with progress_bar(round(total, 2), f"tokenizing with {args.workers} workers", "MiB") as bar:
            metadata = prepare_corpus(
                args.input, args.output_dir, tokenizer, text_key=args.text_key,
                blank_line_documents=args.blank_line_documents, workers=args.workers, overwrite=args.overwrite,
                progress=lambda used: bar.update(used / 2**20),
            )  # fmt: skip
        print(f"prepared {shown(args.output_dir)}: {describe_preparation(metadata, args.output_dir)} in "
              f"{time.time() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Generate with a GLM checkpoint: beam search, length penalty, no-repeat-ngram, minimum length, sampling.

    python predict_generation.py --data_file dev.json --output_file predictions.jsonl
    echo "类型#裙*颜色#红色" | python predict_generation.py          # a prompt per line, JSON out
    python predict_generation.py                                    # interactive prompts

Inputs are read like training data (JSON Lines; the source field auto-detected or --src_key) and built
by the same GLMInputBuilder, so the prompt is exactly the one the model was trained on. Each output row
is the input's fields plus `prediction` (and `filled`, the text with its blanks filled, when the source
holds several [MASK]/[sMASK]; `predictions` when --num_return_sequences > 1). With --output_file, rows
are appended to OUTPUT.partial as batches finish and renamed to OUTPUT at the end; a rerun resumes
from the partial file only when OUTPUT.partial.json (the fingerprint of its input file, model, adapter
and settings) matches the rerun's (else it refuses, or starts afresh with --overwrite_output).
"""

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

from data import build_examples, read_rows
from glm.cli.arguments import parse_flags
from glm.cli.console import progress_bar, say
from glm.cli.process import command, on_interrupt
from glm.bounds import COUNT, check_flag
from glm.errors import DataError, UserError
from glm.files import atomic_file, crash_point, file_sha256, fsync_file, output_file_lock
from glm.generation_settings import GENERATION_SETTINGS, GenerationArguments
from glm.memory.plan import header_line, memory_summary
from glm.prediction import (
    EMBEDDED_DEFAULT_MODEL,
    CheckpointArguments,
    Predictor,
    decoding_memory_plan,
    load_predictor,
    resolve_settings,
)
from glm.resumable_output import files_signature, publish_rows, resumable_rows
from paddlenlp.utils.log import logger

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(ROOT, EMBEDDED_DEFAULT_MODEL)  # the embedded default, once finetuned


@dataclass
class PredictArguments(CheckpointArguments):
    data_file: Optional[str] = field(default=None, metadata={"help": "JSON Lines input (default: prompts from stdin)."})
    output_file: Optional[str] = field(default=None, metadata={"help": "JSON Lines output (default: stdout)."})
    overwrite_output: bool = field(
        default=False, metadata={"help": "Start afresh instead of resuming an OUTPUT.partial made from other inputs."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sources decoded together."})
    src_key: Optional[str] = field(default=None, metadata={"help": "Source field (default: auto-detected)."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip and count bad rows instead of stopping."})
    seed: Optional[int] = field(default=None, metadata={"help": "Seed of sampling."})


def check_output_file(path: str):
    """Before any loading or decoding: `path` must be a file we can create in an existing directory."""
    if os.path.isdir(path):
        raise UserError(f"--output_file {path} is a directory; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"--output_file {path}: no such directory {directory}")
    if not os.access(directory, os.W_OK):
        raise UserError(f"--output_file {path}: cannot write in {directory}")


def output_fingerprint(args: PredictArguments, generation_args: GenerationArguments) -> dict:
    """What a partial output depends on: the input file's bytes, the model, the adapter, the settings."""
    data_sha256 = file_sha256(args.data_file)
    model = args.model_path(DEFAULT_MODEL)
    free = ("output_file", "overwrite_output", "batch_size", "force", "ignore_memory_check", "prefix_path")
    settings = {k: v for k, v in asdict(args).items() if k not in free}
    fingerprint = {
        "data_file_sha256": data_sha256,
        "model": [os.path.abspath(model), files_signature(model)],
        "lora": [args.lora_path and os.path.abspath(args.lora_path), files_signature(args.lora_path)],
        "settings": dict(settings, **asdict(generation_args)),
    }
    if args.prefix_path:
        fingerprint["prefix"] = [os.path.abspath(args.prefix_path), files_signature(args.prefix_path)]
    return json.loads(json.dumps(fingerprint))  # as read back from the sidecar (tuples become lists)


def is_empty(fields: dict) -> bool:
    """Whether an answer (any blank's, when a source holds several) is empty."""
    answers = fields["prediction"] if isinstance(fields["prediction"], list) else [fields["prediction"]]
    return any(not answer for answer in answers)


def say_empty_answers(empty: int, rows: int, min_tgt_length: int):
    """An empty answer is the model ending the blank at once, not a failure; say so once, with the way out."""
    if empty:
        say(f"note     {empty} of {rows} answers are empty: the model ended the blank at once (min_tgt_length "
            f"{min_tgt_length}; --min_tgt_length N makes every answer at least N tokens)")


def predict_file(predictor: Predictor, args: PredictArguments, fingerprint: dict):
    dataset = read_rows(args.data_file, args.src_key, need_target=False, skip_bad_rows=args.skip_bad_rows)
    rows = dataset.rows
    sources = [example.input_ids for example in build_examples(dataset, predictor.builder, with_target=False)]
    partial = args.output_file + ".partial" if args.output_file else None
    done = resumable_rows(partial, fingerprint, args.overwrite_output) if partial else 0
    if done:
        say(f"Resuming: {done} of {len(rows)} rows already in {partial}, made from the same inputs")
    if partial:
        on_interrupt(lambda: f"rerunning the same command continues after the rows already in {partial}")
    output = open(partial, "a", encoding="utf-8") if partial else sys.stdout

    # Chunks of several batches: each chunk is decoded length-sorted, then written in input order.
    chunk = predictor.batch_size * 8
    empty = 0
    with progress_bar(len(rows), "predicting", "row", initial=done) as bar:
        for start in range(done, len(rows), chunk):
            part = rows[start : start + chunk]
            results = predictor.predict([row[dataset.source_key] for row in part], progress=bar.update,
                                        sources=sources[start : start + chunk])
            for row, fields in zip(part, results):
                output.write(json.dumps(dict(row, **fields), ensure_ascii=False) + "\n")
                empty += is_empty(fields)
            output.flush()
            if partial:
                fsync_file(output)
                crash_point("predict:chunk-written")
    if partial:
        output.close()
        publish_rows(partial, args.output_file)
        say(f"Wrote {len(rows)} predictions to {args.output_file}")
    say_empty_answers(empty, len(rows) - done, predictor.config.min_tgt_length)


def predict_stdin(predictor: Predictor, args: PredictArguments):
    """A prompt per line; an --output_file is replaced only once every line has its prediction."""
    if args.output_file:
        with atomic_file(args.output_file) as output:
            _predict_lines(predictor, output, interactive=False)
    else:
        _predict_lines(predictor, sys.stdout, interactive=sys.stdin.isatty())


def _predict_lines(predictor: Predictor, output, interactive: bool):
    if interactive:
        print("Type a prompt (a blank is [MASK], [sMASK] or [gMASK]; none means generate after it). Ctrl-D ends.")
    number = empty = answered = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        raw = sys.stdin.buffer.readline()
        number += 1
        if not raw:
            break
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise DataError(f"stdin:{number}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})") from None
        if not text:
            continue
        source, cut = predictor.builder.source_ids(text)
        if cut:
            logger.warning(f"stdin:{number}: source cut to src_length={predictor.builder.src_length} tokens")
        fields = predictor.predict([text], sources=[source])[0]
        empty, answered = empty + is_empty(fields), answered + 1
        if interactive:
            print(fields.get("filled") or fields["prediction"])
        else:
            output.write(json.dumps(dict(source=text, **fields), ensure_ascii=False) + "\n")
            output.flush()
    if not interactive:
        say_empty_answers(empty, answered, predictor.config.min_tgt_length)


def parse_arguments(argv):
    """Flags; those not given come from the checkpoint's generation_settings.json (what it was evaluated
    with in finetune_generation.py), then from the defaults. One line on stderr says what applies."""
    argv = sys.argv[1:] if argv is None else argv
    args, generation_args = parse_flags(
        (PredictArguments, GenerationArguments), argv,
        description=f"Flags not given take their values from the checkpoint's {GENERATION_SETTINGS} (written "
        "by finetune_generation.py: the lengths and decoding it was evaluated with), then from the defaults "
        "below (THUDM's glm-large-chinese recipe).",
    )
    resolve_settings(argv, args, generation_args, DEFAULT_MODEL)
    return args, generation_args


def main(argv=None):
    with command():
        args, generation_args = parse_arguments(argv)
        check_flag("batch_size", args.batch_size, COUNT)
        if args.output_file:
            check_output_file(args.output_file)
        with output_file_lock(args.output_file):  # two runs into one file would write every row twice
            fingerprint = None
            if args.data_file and args.output_file:
                if not os.path.isfile(args.data_file):
                    raise DataError(f"{args.data_file}: no such file")
                fingerprint = output_fingerprint(args, generation_args)
            memory = decoding_memory_plan(args, generation_args, DEFAULT_MODEL, args.batch_size)
            if memory is not None:
                say(f"memory   {header_line(memory)}")
            predictor = load_predictor(args, generation_args, DEFAULT_MODEL, args.seed, args.batch_size)
            with predictor.packed_weights():
                if args.data_file:
                    predict_file(predictor, args, fingerprint)
                else:
                    predict_stdin(predictor, args)
            say(memory_summary(memory))


if __name__ == "__main__":
    main()

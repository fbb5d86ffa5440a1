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

import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import glm  # noqa: F401  (first: sets the CPU thread count before paddle is imported)
import paddle
from paddlenlp.trainer import PdArgumentParser
from tqdm import tqdm

from console import ConsoleArguments, HelpFormatter, configure_logging, say, shown
from data import DataError, read_rows
from glm.generation import GLMGenerator, default_banned_ids, generate_answers
from glm.inputs import MASK_TOKENS, GLMInputBuilder
from glm.lora import load_lora
from glm.loading import load_model_and_tokenizer
from utils import (
    GENERATION_SETTINGS,
    GenerationArguments,
    UserError,
    atomic_file,
    crash_point,
    exit_on_user_error,
    write_json_atomic,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(ROOT, "checkpoints", "glm-tiny-chinese")  # the embedded default, once finetuned
BLANK = re.compile("|".join(re.escape(token) for token in MASK_TOKENS))


@dataclass
class PredictArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": f"GLM checkpoint directory or PaddleNLP name (default: {shown(DEFAULT_MODEL)}, the "
                          "embedded default once `python finetune_generation.py` has trained it)."},
    )
    lora_path: Optional[str] = field(default=None, metadata={"help": "LoRA adapter directory to apply."})
    force: bool = field(default=False, metadata={"help": "Apply an adapter recorded for another same-shaped base."})
    data_file: Optional[str] = field(default=None, metadata={"help": "JSON Lines input (default: prompts from stdin)."})
    output_file: Optional[str] = field(default=None, metadata={"help": "JSON Lines output (default: stdout)."})
    overwrite_output: bool = field(
        default=False, metadata={"help": "Start afresh instead of resuming an OUTPUT.partial made from other inputs."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sources decoded together."})
    src_length: int = field(default=608, metadata={"help": "Source tokens, with [CLS], the mask and <|endoftext|>."})
    tgt_length: int = field(default=160, metadata={"help": "At most this many new tokens per blank."})
    mask_token: str = field(default="[gMASK]", metadata={"help": "Blank appended to a source without one."})
    src_key: Optional[str] = field(default=None, metadata={"help": "Source field (default: auto-detected)."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip and count bad rows instead of stopping."})
    dtype: str = field(default="float32", metadata={"help": "float32, or float16/bfloat16 on a GPU."})
    seed: Optional[int] = field(default=None, metadata={"help": "Seed of sampling."})


class Predictor:
    """Model, tokenizer, input builder and decoding settings: text in, output rows out."""

    def __init__(self, args: PredictArguments, generation_args: GenerationArguments):
        path = args.model_name_or_path or DEFAULT_MODEL
        if args.model_name_or_path is None and not os.path.isdir(path):
            raise UserError(
                f"no --model_name_or_path, and the embedded default {os.path.relpath(path)} is not trained yet: "
                "run `python finetune_generation.py` first"
            )
        if args.dtype not in ("float32", "float16", "bfloat16"):
            raise UserError(f"--dtype must be float32, float16 or bfloat16; got {args.dtype}")
        if args.dtype != "float32" and not paddle.device.is_compiled_with_cuda():
            raise UserError(f"--dtype {args.dtype} needs a GPU: Paddle's CPU kernels have no half precision")
        model, self.tokenizer = load_model_and_tokenizer(path, None if args.dtype == "float32" else args.dtype)
        if args.lora_path:
            model = load_lora(model, args.lora_path, path, args.force)
        model.eval()
        for name in ("src_length", "tgt_length"):
            if getattr(args, name) > model.config.max_sequence_length:
                raise UserError(
                    f"--{name} {getattr(args, name)} exceeds the model's max_sequence_length {model.config.max_sequence_length}"
                )
        try:
            self.builder = GLMInputBuilder(self.tokenizer, args.src_length, args.tgt_length, args.mask_token)
        except ValueError as error:
            raise UserError(str(error)) from None
        self.config = generation_args.config(args.tgt_length, seed=args.seed)
        self.generator = GLMGenerator(model, self.builder.ids, default_banned_ids(model.config, self.tokenizer))
        self.batch_size = args.batch_size

    def predict(self, texts: List[str], progress=None):
        """Per text, the fields to add to its output row."""
        answers = generate_answers(self.generator, self.builder, texts, self.config, self.batch_size, progress)
        return [self.output_fields(text, blanks) for text, blanks in zip(texts, answers)]

    def output_fields(self, text, blanks):
        best = [candidates[0] for candidates in blanks]
        fields = {"prediction": best[0] if len(best) == 1 else best}
        if len(best) > 1:  # fill the blanks of the text, left to right
            answers = iter(best)
            fields["filled"] = BLANK.sub(lambda match: next(answers, match.group(0)), text)
        if self.config.num_return_sequences > 1:
            fields["predictions"] = blanks[0] if len(blanks) == 1 else blanks
        return fields


def check_output_file(path: str):
    """Before any loading or decoding: `path` must be a file we can create in an existing directory."""
    if os.path.isdir(path):
        raise UserError(f"--output_file {path} is a directory; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"--output_file {path}: no such directory {directory}")
    if not os.access(directory, os.W_OK):
        raise UserError(f"--output_file {path}: cannot write in {directory}")


def _files_signature(directory: Optional[str]):
    """Cheap identity of a checkpoint or adapter: its weight and config files' names, sizes and mtimes."""
    if not directory or not os.path.isdir(directory):
        return directory
    return sorted(
        (name, stat.st_size, stat.st_mtime_ns)
        for name in os.listdir(directory)
        if name.endswith((".pdparams", ".safetensors", ".json")) and not name.startswith(".")
        for stat in [os.stat(os.path.join(directory, name))]
    )


def output_fingerprint(args: PredictArguments, generation_args: GenerationArguments) -> dict:
    """What a partial output depends on: the input file's bytes, the model, the adapter, the settings."""
    with open(args.data_file, "rb") as f:
        data_sha256 = hashlib.sha256(f.read()).hexdigest()
    model = args.model_name_or_path or DEFAULT_MODEL
    settings = {k: v for k, v in asdict(args).items() if k not in ("output_file", "overwrite_output", "batch_size", "force")}
    fingerprint = {
        "data_file_sha256": data_sha256,
        "model": [os.path.abspath(model), _files_signature(model)],
        "lora": [args.lora_path and os.path.abspath(args.lora_path), _files_signature(args.lora_path)],
        "settings": dict(settings, **asdict(generation_args)),
    }
    return json.loads(json.dumps(fingerprint))  # as read back from the sidecar (tuples become lists)


def resumable_rows(partial: str, fingerprint: dict, overwrite: bool) -> int:
    """Rows of `partial` made from the same inputs; a partial made from other ones is refused or removed."""
    sidecar = partial + ".json"
    if os.path.exists(partial):
        try:
            with open(sidecar, encoding="utf-8") as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            recorded = None
        if recorded != fingerprint:
            differing = [key for key in fingerprint if not recorded or recorded.get(key) != fingerprint[key]]
            if not overwrite:
                raise UserError(
                    f"{partial} was made from other inputs (differing: {', '.join(differing)}): rerun with the same "
                    "ones to resume it, or with --overwrite_output to start afresh"
                )
            say(f"Starting afresh: removing {partial} (made from other inputs; --overwrite_output)")
            os.unlink(partial)
    write_json_atomic(sidecar, fingerprint)
    return _completed_rows(partial)


def predict_file(predictor: Predictor, args: PredictArguments, fingerprint: dict):
    dataset = read_rows(args.data_file, args.src_key, need_target=False, skip_bad_rows=args.skip_bad_rows)
    rows = dataset.rows
    partial = args.output_file + ".partial" if args.output_file else None
    done = resumable_rows(partial, fingerprint, args.overwrite_output) if partial else 0
    if done:
        say(f"Resuming: {done} of {len(rows)} rows already in {partial}, made from the same inputs")
    output = open(partial, "a", encoding="utf-8") if partial else sys.stdout

    # Chunks of several batches: each chunk is decoded length-sorted, then written in input order.
    chunk = predictor.batch_size * 8
    with tqdm(total=len(rows), initial=done, desc="predicting", unit="row", file=sys.stderr) as bar:
        for start in range(done, len(rows), chunk):
            part = rows[start : start + chunk]
            results = predictor.predict([row[dataset.source_key] for row in part], progress=bar.update)
            for row, fields in zip(part, results):
                output.write(json.dumps(dict(row, **fields), ensure_ascii=False) + "\n")
            output.flush()
            if partial:
                os.fsync(output.fileno())
                crash_point("predict:chunk-written")
    if partial:
        output.close()
        os.replace(partial, args.output_file)
        os.unlink(partial + ".json")
        say(f"Wrote {len(rows)} predictions to {args.output_file}")


def _completed_rows(partial: str) -> int:
    """Whole JSON lines already in a partial output; a torn last line (a killed run) is cut off."""
    if not os.path.exists(partial):
        return 0
    with open(partial, "rb") as f:
        data = f.read()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(partial, "wb") as f:
            f.write(keep)
    return keep.count(b"\n")


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
    number = 0
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
        fields = predictor.predict([text])[0]
        if interactive:
            print(fields.get("filled") or fields["prediction"])
        else:
            output.write(json.dumps(dict(source=text, **fields), ensure_ascii=False) + "\n")
            output.flush()


def parse_arguments(argv):
    """Flags; those not given come from the checkpoint's generation_settings.json (what it was evaluated
    with in finetune_generation.py), then from the defaults. One line on stderr says what applies."""
    argv = sys.argv[1:] if argv is None else argv
    configure_logging(argv)
    parser = PdArgumentParser(
        (PredictArguments, GenerationArguments, ConsoleArguments),
        formatter_class=HelpFormatter,
        description=f"Flags not given take their values from the checkpoint's {GENERATION_SETTINGS} (written "
        "by finetune_generation.py: the lengths and decoding it was evaluated with), then from the defaults "
        "below (THUDM's glm-large-chinese recipe).",
    )
    try:
        args, generation_args, _ = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:
        raise UserError(str(error).splitlines()[0]) from None
    settings_file = os.path.join(args.model_name_or_path or DEFAULT_MODEL, GENERATION_SETTINGS)
    source = "built-in defaults"
    if os.path.isfile(settings_file):
        with open(settings_file, encoding="utf-8") as f:
            settings = json.load(f)
        given = {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}
        for name, value in settings.items():
            for target in (args, generation_args):
                if hasattr(target, name) and name not in given:
                    setattr(target, name, value)
        source = shown(settings_file)
    say(f"settings src_length {args.src_length}, tgt_length {args.tgt_length}, {describe_decoding(generation_args)} "
        f"(flags given, then {source})")
    return args, generation_args


def describe_decoding(generation_args: GenerationArguments) -> str:
    g = generation_args
    if g.decode_strategy == "beam_search":
        text = f"beam search {g.num_beams} beams, length_penalty {g.length_penalty} ({g.length_penalty_form})"
    elif g.decode_strategy == "sampling":
        text = f"sampling top_k {g.top_k} top_p {g.top_p} temperature {g.temperature}"
    else:
        text = g.decode_strategy
    return f"{text}, min_tgt_length {g.min_tgt_length}, no_repeat_ngram_size {g.no_repeat_ngram_size}"


def main(argv=None):
    with exit_on_user_error():
        args, generation_args = parse_arguments(argv)
        if args.batch_size < 1:
            raise UserError(f"--batch_size must be at least 1; got {args.batch_size}")
        if args.output_file:
            check_output_file(args.output_file)
        fingerprint = None
        if args.data_file and args.output_file:
            if not os.path.isfile(args.data_file):
                raise DataError(f"{args.data_file}: no such file")
            fingerprint = output_fingerprint(args, generation_args)
        predictor = Predictor(args, generation_args)
        if args.data_file:
            predict_file(predictor, args, fingerprint)
        else:
            predict_stdin(predictor, args)


if __name__ == "__main__":
    main()

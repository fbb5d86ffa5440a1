"""Shared helpers of the entry scripts: Chinese generation metrics, atomic writes, one-line errors."""

import contextlib
import json
import os
import sys
import tempfile
import unicodedata
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

from glm.generation import GenerationConfig

__all__ = [
    "GenerationArguments", "GENERATION_SETTINGS", "generation_metrics", "write_jsonl_atomic", "write_json_atomic",
    "atomic_file", "current_umask", "exit_on_user_error", "UserError", "crash_point", "CRASH_AT_VARIABLE",
]  # fmt: skip


class UserError(Exception):
    """A mistake of the user's (a path, a flag, a config): reported in one line, exit status 2."""


@dataclass
class GenerationArguments:
    """Decoding flags shared by finetune_generation.py (evaluation) and predict_generation.py (THUDM defaults)."""

    decode_strategy: str = field(default="beam_search", metadata={"help": "beam_search, greedy_search or sampling."})
    min_tgt_length: int = field(default=55, metadata={"help": "No end-of-piece before this many tokens."})
    num_beams: int = field(default=5, metadata={"help": "Beam width."})
    length_penalty: float = field(default=0.7, metadata={"help": "Beam score = logprob / length ** penalty."})
    length_penalty_form: str = field(default="thudm", metadata={"help": "thudm: len**lp; gnmt: ((5+len)/6)**lp."})
    no_repeat_ngram_size: int = field(default=3, metadata={"help": "Never repeat a generated n-gram of this size."})
    select_topk: bool = field(default=True, metadata={"help": "Beam candidates by top-k (else sampled)."})
    top_k: int = field(default=0, metadata={"help": "Sampling: keep the k most likely tokens (0: all)."})
    top_p: float = field(default=1.0, metadata={"help": "Sampling: nucleus mass (1.0 or 0: off)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    num_return_sequences: int = field(default=1, metadata={"help": "Answers kept per blank (prediction)."})

    def config(self, tgt_length: int, seed: Optional[int] = None) -> GenerationConfig:
        try:
            return GenerationConfig(
                decode_strategy=self.decode_strategy,
                tgt_length=tgt_length,
                min_tgt_length=self.min_tgt_length,
                num_beams=self.num_beams,
                length_penalty=self.length_penalty,
                length_penalty_form=self.length_penalty_form,
                select_topk=self.select_topk,
                no_repeat_ngram_size=self.no_repeat_ngram_size,
                top_k=self.top_k,
                top_p=self.top_p,
                temperature=self.temperature,
                num_return_sequences=self.num_return_sequences,
                seed=seed,
            )
        except ValueError as error:
            raise UserError(str(error)) from None


# Written by finetune_generation.py beside the model: the input lengths and decoding flags it was
# evaluated with, which predict_generation.py takes as its defaults.
GENERATION_SETTINGS = "generation_settings.json"


def _segment(text: str) -> List[str]:
    import jieba

    # The GLM tokenizer normalises with NFKC (，becomes ,): compare texts in that form on both sides.
    return [word for word in jieba.cut(unicodedata.normalize("NFKC", text)) if word.strip()]


def generation_metrics(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """ROUGE-1/2/L (mean sentence F1) and corpus BLEU-4 on jieba words, in percent.

    Scored on words, not token ids (the anchor scores sentencepiece ids). An empty prediction scores 0.
    """
    import jieba
    from paddlenlp.metrics import BLEU
    from rouge import Rouge

    jieba.setLogLevel(60)  # jieba prints its dictionary loading to stderr otherwise
    rouge, bleu = Rouge(), BLEU(n_size=4)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references):
        hypothesis_words, reference_words = _segment(prediction), _segment(reference)
        bleu.add_inst(hypothesis_words, [reference_words])
        if not hypothesis_words or not reference_words:
            continue
        scores = rouge.get_scores(" ".join(hypothesis_words), " ".join(reference_words))[0]
        totals["rouge1"] += scores["rouge-1"]["f"]
        totals["rouge2"] += scores["rouge-2"]["f"]
        totals["rougeL"] += scores["rouge-l"]["f"]
    count = max(len(predictions), 1)
    metrics = {name: round(100 * value / count, 4) for name, value in totals.items()}
    # PaddleNLP's BLEU divides by the hypothesis length: all predictions empty (a diverged model) score 0.
    scorable = any(_segment(prediction) for prediction in predictions)
    metrics["bleu4"] = round(100 * bleu.score(), 4) if scorable else 0.0
    return metrics


@contextlib.contextmanager
def atomic_file(path: str):
    """A temporary file beside `path`, renamed onto it only when writing succeeded."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes 0600; others must read our outputs
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            yield f
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def write_jsonl_atomic(path: str, rows: Iterable[dict]):
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json_atomic(path: str, value):
    with atomic_file(path) as f:
        json.dump(value, f, ensure_ascii=False, indent=2)


def user_error_types() -> tuple:
    """Every exception the project raises for a user's mistake (a flag, a path, a file, an adapter). One
    list for all entry scripts: each script listing its own had let an adapter refusal escape as a
    traceback from the scripts that forgot AdapterError."""
    from data import DataError  # here, not at the top: data and glm import this module's neighbours
    from glm.loading import CheckpointError
    from glm.lora import AdapterError
    from glm.tokenization import TokenizerError

    return (UserError, DataError, CheckpointError, AdapterError, TokenizerError)


@contextlib.contextmanager
def exit_on_user_error():
    """Turns a user's mistake (`user_error_types`) into `error: message` on stderr and exit status 2."""
    try:
        yield
    except user_error_types() as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


# Fault injection for tests/test_faults.py: GLM_PADDLE_CRASH_AT=NAME (or NAME#N, the N-th time) makes
# the process SIGKILL itself when it reaches crash_point(NAME); a deterministic kill, not a timed one.
CRASH_AT_VARIABLE = "GLM_PADDLE_CRASH_AT"
_crash_counts: Dict[str, int] = {}


def crash_point(name: str, torn_file: Optional[str] = None):
    """Kill this process here if the environment asks for it; `torn_file` is first cut to half its size
    (a write interrupted midway)."""
    wanted = os.environ.get(CRASH_AT_VARIABLE)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] < int(nth or 1):
        return
    if torn_file is not None:
        os.truncate(torn_file, os.path.getsize(torn_file) // 2)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), 9)

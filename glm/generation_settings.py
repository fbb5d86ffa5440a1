"""The decoding flags (GenerationArguments) and the settings file a finetuned checkpoint carries: the lengths
and decoding it was evaluated with, which predict_generation.py and server.py take as their defaults.
Training writes it and reads it (a named model's defaults); prediction reads it."""

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

from .generation import GenerationConfig

__all__ = ["GenerationArguments", "GENERATION_SETTINGS", "apply_checkpoint_settings", "fit_to_model", "strategy_in_brief", "describe_decoding"]


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
        """These settings for answers of at most `tgt_length` tokens; InvalidSettings names each bad one."""
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


# Written by finetune_generation.py beside the model: the input lengths and decoding flags it was
# evaluated with, which predict_generation.py takes as its defaults.
GENERATION_SETTINGS = "generation_settings.json"


def apply_checkpoint_settings(directories: Sequence[str], given: Iterable[str], *targets) -> List[str]:
    """Sets every field of `targets` (argument dataclasses) that a GENERATION_SETTINGS file in `directories`
    names and the user did not give (`given`: flag names without dashes); a directory earlier in the list
    wins (a LoRA adapter's settings over its base's). Returns the paths of the files read, in order."""
    taken, read = set(given), []
    for directory in directories:
        settings_file = os.path.join(directory, GENERATION_SETTINGS)
        if not os.path.isfile(settings_file):
            continue
        with open(settings_file, encoding="utf-8") as f:
            settings = json.load(f)
        for name, value in settings.items():
            for target in targets:
                if hasattr(target, name) and name not in taken:
                    setattr(target, name, value)
        taken |= set(settings)
        read.append(settings_file)
    return read


def fit_to_model(model_dir: str, given: Iterable[str], lengths: Sequence[str], *targets) -> List[str]:
    """Values of `targets` the user did not give (`given`) brought down to what `model_dir` can take: each
    `lengths` field above the model's max_sequence_length (from its config.json, when it has one) to it, then a
    min_tgt_length above tgt_length to it. Returns what changed, as "name old → new (why)", for one note."""
    given, changed = set(given), []
    limit = None
    config_file = os.path.join(model_dir, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            limit = json.load(f).get("max_sequence_length")

    def lower(target, name, high, high_is):
        value = getattr(target, name, None)
        if name not in given and isinstance(value, int) and isinstance(high, int) and value > high:
            setattr(target, name, high)
            changed.append(f"{name} {value} → {high} ({high_is})")

    for target in targets:
        for name in lengths:
            lower(target, name, limit, "the model's max_sequence_length")
    tgt_length = next((t.tgt_length for t in targets if hasattr(t, "tgt_length")), None)
    for target in targets:
        lower(target, "min_tgt_length", tgt_length, "tgt_length")
    return changed


def strategy_in_brief(settings) -> str:
    """"beam search, 5 beams", "greedy search" or "sampling" (`settings`: GenerationArguments or GenerationConfig)."""
    if settings.decode_strategy == "beam_search":
        return f"beam search, {settings.num_beams} beam{'s' if settings.num_beams != 1 else ''}"
    return settings.decode_strategy.replace("_", " ")


def describe_decoding(generation_args: GenerationArguments) -> str:
    g = generation_args
    if g.decode_strategy == "beam_search":
        text = f"{strategy_in_brief(g)}, length_penalty {g.length_penalty} ({g.length_penalty_form})"
    elif g.decode_strategy == "sampling":
        text = f"sampling top_k {g.top_k} top_p {g.top_p} temperature {g.temperature}"
    else:
        text = g.decode_strategy
    return f"{text}, min_tgt_length {g.min_tgt_length}, no_repeat_ngram_size {g.no_repeat_ngram_size}"

"""The bounds of every value a user gives (lengths, beams, sampling settings, ratios, counts), each defined
once and used wherever the value is checked: the flags of every entry script, GLMInputBuilder,
GenerationConfig, the loader (lengths against the model) and the server's request schema. A problem is
said the same way everywhere; only the name in front differs (`--tgt_length` on a command line,
`max_tokens:` in a request, `tgt_length` in the library).
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional

from .errors import UserError

__all__ = [
    "Bound", "SRC_LENGTH", "TGT_LENGTH", "SEQ_LENGTH", "MIN_TGT_LENGTH", "COUNT", "NON_NEGATIVE", "RATIO",
    "POSITIVE", "LENGTH_PENALTY", "SEED", "check_flag", "check_lengths", "length_bound",
]  # fmt: skip


@dataclass(frozen=True)
class Bound:
    """A range of numbers: `low` (excluded when `low_open`) and an optional `high`; `why` says what the low
    bound stands for."""

    low: float
    high: Optional[float] = None
    low_open: bool = False
    why: str = ""

    def problem(self, value, high: Optional[float] = None, high_is: str = "", model_max: Optional[int] = None
                ) -> Optional[str]:
        """What is wrong with `value`, without its name ("must be at least 1; got 0"), or None. `high` (said
        as `high_is`) narrows the range for this use; `model_max` is the model's max_sequence_length."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a finite number; got {value}"
        if model_max is not None:
            if value > model_max:
                return f"{value} exceeds the model's max_sequence_length {model_max}"
            high, high_is = model_max, "the model's max_sequence_length"
        high = self.high if high is None else high
        if self.low_open and value <= self.low:
            return ("must be positive" if self.low == 0 else f"must be above {self.low:g}") + f"; got {value}"
        if value < self.low or (high is not None and value > high):
            if high is None:
                return f"must be at least {self.low:g}{f' ({self.why})' if self.why else ''}; got {value}"
            return f"must be between {self.low:g} and {high:g}{f' ({high_is})' if high_is else ''}; got {value}"
        return None


SRC_LENGTH = Bound(4, why="[CLS], one token, the blank and <|endoftext|>")
TGT_LENGTH = Bound(1, why="one answer token")  # generated tokens per blank; in training, target tokens with <|endofpiece|>
SEQ_LENGTH = Bound(3, why="[CLS], one token and a blank")  # a language-model window
MIN_TGT_LENGTH = Bound(0)  # up to tgt_length
COUNT = Bound(1)  # beams, answers, batch sizes, rows, steps
NON_NEGATIVE = Bound(0)
RATIO = Bound(0, 1)
POSITIVE = Bound(0, low_open=True)
# Beam scores divide by length ** penalty: beyond +-10, 1024 ** 1000 overflows and 1024 ** -1000 is 0 (THUDM's
# runs use 0 to 2).
LENGTH_PENALTY = Bound(-10, 10)
SEED = Bound(0, 2**63 - 1)  # NumPy's generators take non-negative seeds


def check_flag(name: str, value, bound: Bound, **limits):
    """A UserError `--NAME problem` when `value` is out of `bound` (`limits`: Bound.problem's)."""
    problem = bound.problem(value, **limits)
    if problem:
        raise UserError(f"--{name} {problem}")


def length_bound(name: str) -> Bound:
    """The bound of length flag `name`: a source, a target, or a language-model window."""
    return {"src_length": SRC_LENGTH, "tgt_length": TGT_LENGTH}.get(name, SEQ_LENGTH)


def check_lengths(lengths: Dict[str, int], model_max: int, suggestion: str = ""):
    """A UserError for the first of `lengths` ({flag: value}) out of its bound for a model of `model_max`
    positions; one above the model says what fits (`suggestion`: more ways out, e.g. a recipe)."""
    for name, value in lengths.items():
        problem = length_bound(name).problem(value, model_max=model_max)
        if problem is None:
            continue
        if isinstance(value, int) and value > model_max:
            raise UserError(f"--{name} {problem}: pass --{name} {model_max} or less" + suggestion)
        raise UserError(f"--{name} {problem}")

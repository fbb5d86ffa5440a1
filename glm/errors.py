"""Every error this toolkit raises for a user's mistake, in one hierarchy at the bottom of the package.

A `UserError` is a mistake of the user's (a flag, a path, a file, an adapter, a request): an entry script
says it in one line, `error: ...`, and exits with status 2 (glm.cli.process); the server answers 400.
Anything else that escapes is a bug and keeps its traceback. The subclasses say which input was wrong;
those that are also `ValueError`s are raised where a library caller expects a ValueError (bad data, a
checkpoint that does not load, ...).
"""

from typing import List, Optional, Tuple

__all__ = [
    "UserError", "InvalidSettings", "DataError", "CheckpointError", "TokenizerError", "AdapterError",
    "LoRAMergeError", "ConversionError", "TrainingDiverged", "RequestError",
]  # fmt: skip


class UserError(Exception):
    """A mistake of the user's (a path, a flag, a config): reported in one line, exit status 2."""

    def for_command_line(self) -> str:
        """The line an entry script prints (after `error: `)."""
        return str(self)


class InvalidSettings(UserError, ValueError):
    """Settings out of their bounds (glm.bounds): `problems` [(name, what is wrong)], said as `name problem`
    by the library, `--name problem` on a command line, and per field in a request."""

    def __init__(self, problems: List[Tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{name} {text}" for name, text in self.problems))

    def for_command_line(self) -> str:
        return "; ".join(f"--{name} {text}" for name, text in self.problems)


class DataError(UserError, ValueError):
    """Bad data, said in one line that names the file (and line)."""


class CheckpointError(UserError, ValueError):
    """A model path that cannot be loaded, or a model and tokenizer that do not fit together."""


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be used for GLM (missing, or special tokens not distinct)."""


class AdapterError(UserError, ValueError):
    """An adapter that does not belong to the base it is applied to."""


class LoRAMergeError(AdapterError):
    """A base or adapter that cannot be merged."""


class ConversionError(UserError, ValueError):
    """A THUDM checkpoint that cannot be converted."""


class TrainingDiverged(UserError):
    """A non-finite loss or weights: training stops before anything non-finite is saved."""


class RequestError(UserError, ValueError):
    """A bad HTTP request, said in one line that names the field (`param`): answered with `status`."""

    def __init__(self, param: Optional[str], message: str, status: int = 400):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.status = param, status

"""The user's mistakes, said in one line: the error types every entry script turns into `error: ...` and
exit status 2, instead of a traceback."""

import contextlib
import sys

__all__ = ["UserError", "DataError", "user_error_types", "exit_on_user_error"]


class UserError(Exception):
    """A mistake of the user's (a path, a flag, a config): reported in one line, exit status 2."""


class DataError(ValueError):
    """Bad data, said in one line that names the file (and line)."""


def user_error_types() -> tuple:
    """Every exception the project raises for a user's mistake (a flag, a path, a file, an adapter). One
    list for all entry scripts: each script listing its own had let an adapter refusal escape as a
    traceback from the scripts that forgot AdapterError."""
    from .loading import CheckpointError  # here, not at the top: those modules import paddle
    from .lora import AdapterError
    from .tokenization import TokenizerError

    return (UserError, DataError, CheckpointError, AdapterError, TokenizerError)


@contextlib.contextmanager
def exit_on_user_error():
    """Turns a user's mistake (`user_error_types`) into `error: message` on stderr and exit status 2."""
    try:
        yield
    except user_error_types() as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)

"""How an entry script stops: a user's mistake in one line (`error: ...`, exit status 2) instead of a
traceback, and an interruption (Ctrl-C, SIGTERM) in one line that says how to go on (exit 128 + signal).
Either way progress bars are closed first, so that line is the last one, and the output-dir locks are
released."""

import contextlib
import signal
import sys
import threading
from typing import Callable, List, Optional, Union

__all__ = ["UserError", "DataError", "Terminated", "user_error_types", "exit_on_user_error", "on_interrupt", "at_exit"]


class UserError(Exception):
    """A mistake of the user's (a path, a flag, a config): reported in one line, exit status 2."""


class DataError(ValueError):
    """Bad data, said in one line that names the file (and line)."""


class Terminated(BaseException):
    """SIGTERM, raised where the process is (as Python raises KeyboardInterrupt for SIGINT)."""


def user_error_types() -> tuple:
    """Every exception the project raises for a user's mistake (a flag, a path, a file, an adapter). One
    list for all entry scripts: each script listing its own had let an adapter refusal escape as a
    traceback from the scripts that forgot AdapterError."""
    from .loading import CheckpointError  # here, not at the top: those modules import paddle
    from .lora import AdapterError
    from .tokenization import TokenizerError

    return (UserError, DataError, CheckpointError, AdapterError, TokenizerError)


_interrupt_note: Optional[Union[str, Callable[[], str]]] = None
_exit_cleanups: List[Callable[[], None]] = []


def on_interrupt(note: Optional[Union[str, Callable[[], str]]]):
    """What the line printed on an interruption adds (or a function computing it then), e.g. "rerunning
    the same command continues from checkpoint-8". Set by whoever knows how the work resumes."""
    global _interrupt_note
    _interrupt_note = note


def at_exit(cleanup: Callable[[], None]):
    """Run `cleanup` before the one line of an error or interruption (also when the caller is a test that
    keeps the process alive; atexit covers uncaught exceptions)."""
    if cleanup not in _exit_cleanups:
        _exit_cleanups.append(cleanup)


def _stop(line: str, status: int):
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # a bar's final redraw would follow the line
        bar.close()
    for cleanup in _exit_cleanups:
        cleanup()
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def exit_on_user_error():
    """Turns a user's mistake (`user_error_types`) into `error: message` on stderr and exit status 2, and
    Ctrl-C / SIGTERM into `stopped by ...` with the `on_interrupt` note and exit status 130 / 143."""
    on_interrupt(None)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        yield
    except user_error_types() as error:
        _stop(f"error: {error}", 2)
    except (KeyboardInterrupt, Terminated) as stop:
        how, signum = ("SIGTERM", signal.SIGTERM) if isinstance(stop, Terminated) else ("Ctrl-C (SIGINT)", signal.SIGINT)
        note = _interrupt_note() if callable(_interrupt_note) else _interrupt_note
        _stop(f"stopped by {how}" + (f": {note}" if note else ""), 128 + signum)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)

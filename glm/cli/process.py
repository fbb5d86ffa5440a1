"""What running as a command means, for every entry script and tool (`with command():`): Paddle computes on
every core this process may use, memory freed by tensors goes back to the system, a user's mistake ends in one line (`error: ...`, exit status 2) instead
of a traceback, and an interruption (Ctrl-C, SIGTERM) in one line that says how to go on (exit 128 +
signal). Either way progress bars are closed first, so that line is the last one; the output locks are
released on the way out by the `with` that holds them (glm.files)."""

import contextlib
import ctypes
import os
import signal
import sys
import threading
from typing import Callable, Dict, Optional, Union

from ..errors import UserError

__all__ = ["command", "exit_on_user_error", "use_all_cores", "return_freed_memory", "on_interrupt", "Terminated",
           "compute_threads"]  # fmt: skip


class Terminated(BaseException):
    """SIGTERM, raised where the process is (as Python raises KeyboardInterrupt for SIGINT)."""


def initial_environment(path: str = "/proc/self/environ") -> Dict[str, str]:
    """The environment this process was started with: Paddle's import writes OMP_NUM_THREADS=1 into
    os.environ when it is unset, so os.environ cannot tell the user's setting from Paddle's."""
    try:
        with open(path, "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:  # no /proc: take os.environ as it is now
        return dict(os.environ)
    return dict(entry.decode("utf-8", "replace").split("=", 1) for entry in entries if b"=" in entry)


_threads: Optional[int] = None  # what use_all_cores set


def use_all_cores(environ: Optional[Dict[str, str]] = None) -> Optional[int]:
    """Paddle's CPU kernels (MKL and OpenMP) on every core this process may use, unless the user started it
    with OMP_NUM_THREADS (paddle.distributed.launch starts each worker with 1): GLM on 2 cores runs ~1.4x
    faster than with the single thread Paddle pins at import. Set through Paddle's runtime call, not the
    variable: the variable would have to precede Paddle's import, and Paddle then prints a warning about
    data parallel. Returns the thread count set, or None where the user's setting stands."""
    global _threads
    environ = initial_environment() if environ is None else environ
    if "OMP_NUM_THREADS" in environ:
        return None
    from paddle.base import core

    _threads = len(os.sched_getaffinity(0))
    core.set_num_threads(_threads)
    return _threads


MMAP_THRESHOLD = 1 << 20  # bytes: every tensor of a MiB or more gets pages of its own, returned when freed
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_memory(environ: Optional[Dict[str, str]] = None) -> bool:
    """Tensors of a MiB or more are mapped on their own and returned to the system when freed, unless the
    user started the process with MALLOC_MMAP_THRESHOLD_. Paddle's CPU allocator takes tensors from glibc's
    malloc, whose threshold otherwise grows to 32 MiB as large blocks are freed: later tensors then come
    from the heap, which keeps what they free, and a training step's resident peak was 30-47 % above its
    tensors (1.8-2.0 GiB for a 12-layer, hidden-1024 GLM; bench/memory.py). Mapping costs page faults, about
    10 % of a CPU training step; it makes the peak what the tensors need, so the memory plan holds. Returns
    whether it was set (False where glibc or the user's setting decides)."""
    environ = initial_environment() if environ is None else environ
    if "MALLOC_MMAP_THRESHOLD_" in environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def compute_threads() -> int:
    """The threads Paddle's CPU kernels use in this process."""
    return _threads or int(os.environ.get("OMP_NUM_THREADS", "1"))


_interrupt_note: Optional[Union[str, Callable[[], str]]] = None


def on_interrupt(note: Optional[Union[str, Callable[[], str]]]):
    """What the line printed on an interruption adds (or a function computing it then), e.g. "rerunning
    the same command continues from checkpoint-8". Set by whoever knows how the work resumes."""
    global _interrupt_note
    _interrupt_note = note


def _stop(line: str, status: int):
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # a bar's final redraw would follow the line
        bar.close()
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)


_handler_pid: Optional[int] = None  # the process exit_on_user_error installed _raise_stop in


def _raise_stop(signum, frame):
    """SIGTERM -> Terminated, SIGINT -> KeyboardInterrupt, raised where the process is."""
    if os.getpid() != _handler_pid:
        # A forked child (a multiprocessing worker) signalled before it could reset the handler it inherited:
        # raising there would unwind the parent's copied stack in the child, which then ran on as a second
        # copy of the command (seen: a pool terminated while it forked a worker). It ends as the signal ends it.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def exit_on_user_error(also: tuple = ()):
    """Turns a user's mistake (a UserError, or one of `also`, e.g. OSError where a tool writes its output)
    into `error: message` on stderr and exit status 2, and Ctrl-C / SIGTERM into `stopped by ...` with
    the `on_interrupt` note and exit status 130 / 143."""
    global _handler_pid
    on_interrupt(None)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    _handler_pid = os.getpid()
    handled = (signal.SIGTERM,) + ((signal.SIGINT,) if signal.getsignal(signal.SIGINT) != signal.SIG_IGN else ())
    previous = {signum: signal.signal(signum, _raise_stop) for signum in handled} if main_thread else {}
    try:
        yield
    except (UserError, *also) as error:
        _stop(f"error: {error.for_command_line() if isinstance(error, UserError) else error}", 2)
    except (KeyboardInterrupt, Terminated) as stop:
        how, signum = ("SIGTERM", signal.SIGTERM) if isinstance(stop, Terminated) else ("Ctrl-C (SIGINT)", signal.SIGINT)
        note = _interrupt_note() if callable(_interrupt_note) else _interrupt_note
        _stop(f"stopped by {how}" + (f": {note}" if note else ""), 128 + signum)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def command(also: tuple = (), freed_memory_returned: bool = True):
    """The body of an entry script's main(): every core, freed memory returned (unless
    `freed_memory_returned` is False: see server.py), and the one-line stops of exit_on_user_error."""
    use_all_cores()
    if freed_memory_returned:
        return_freed_memory()
    with exit_on_user_error(also):
        yield

"""glm-paddle: GLM (General Language Model, autoregressive blank infilling) on PaddlePaddle.

The model and what feeds it: configuration, modeling, tokenization, inputs (the one input builder),
generation (decoding), loading, lora, lora_merge, convert; prediction (checkpoint -> answers), errors,
files (atomic writes), jsonl (row reading), resumable_output. Subpackages: training (the finetuning
driver every task shares) and understanding (multiple choice, cloze finetuning, LM evaluation).
"""

import contextlib
import io
import os
import sys
import warnings
from typing import Optional

# Noise Paddle's import prints on every run of every script, unrelated to anything the user can change.
warnings.filterwarnings("ignore", message="No ccache found")
warnings.filterwarnings("ignore", message="Setuptools is replacing distutils")

# Paddle's import warns about any OMP_NUM_THREADS above 1 (a data-parallel concern: OpenBLAS builds, one
# thread per worker). Its own banner, not a Python warning, so it is dropped from stderr by prefix.
PADDLE_THREAD_WARNING = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")


@contextlib.contextmanager
def _without_paddle_thread_warning():
    """stderr held back while Paddle imports; everything but its OMP_NUM_THREADS banner is passed on."""
    real, held = sys.stderr, io.StringIO()
    sys.stderr = held
    try:
        yield
    finally:
        sys.stderr = real
        lines = held.getvalue().splitlines(keepends=True)
        real.write("".join(line for line in lines if not line.startswith(PADDLE_THREAD_WARNING)))


def read_cpuinfo(path: str = "/proc/cpuinfo") -> str:
    """The CPU description Linux gives, or "" where there is none (another OS, a sandbox hiding /proc)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read()
    except OSError:
        return ""


def mkl_cpu_type(cpuinfo: str) -> Optional[str]:
    """The MKL_DEBUG_CPU_TYPE that makes MKL use its AVX2 kernels on this CPU, or None to leave MKL alone.

    The MKL in Paddle's CPU wheel (libmklml_intel) picks its kernels by CPU vendor: on AMD it takes a generic
    SSE path, 2.5-3x slower for GLM's matmuls, unless MKL_DEBUG_CPU_TYPE=5 names the AVX2 path. That path
    needs AVX2 and FMA (it would crash without them), so every processor listed must have both. Intel CPUs
    get their fast path already; other vendors are left as they are.
    """
    fields = [line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line]
    vendors = [value.strip() for key, value in fields if key.strip() == "vendor_id"]
    flags = [set(value.split()) for key, value in fields if key.strip() == "flags"]
    if not vendors or set(vendors) != {"AuthenticAMD"} or not flags:
        return None
    return "5" if all({"avx2", "fma"} <= cpu_flags for cpu_flags in flags) else None


def use_fast_mkl_kernels(environ=os.environ, cpuinfo: Optional[str] = None) -> None:
    """Sets MKL_DEBUG_CPU_TYPE where `mkl_cpu_type` says so, unless the user set it (to anything, even "").
    MKL reads it at its first matmul, so this must run before any. An MKL that ignores the variable (a newer
    one, or no MKL at all) costs nothing: the variable is then just unread."""
    if "MKL_DEBUG_CPU_TYPE" in environ:
        return
    value = mkl_cpu_type(read_cpuinfo() if cpuinfo is None else cpuinfo)
    if value is not None:
        environ["MKL_DEBUG_CPU_TYPE"] = value


use_fast_mkl_kernels()
# Paddle pins OMP_NUM_THREADS=1 at import when it is unset; GLM on 2 CPU cores runs ~1.4x faster with
# both. (paddle.distributed.launch sets OMP_NUM_THREADS=1 for each worker itself, so workers keep 1.)
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
if "paddle" not in sys.modules:
    with _without_paddle_thread_warning():  # a warning about data parallel on OpenBLAS: not our case
        import paddle  # noqa: F401

from .configuration import GLMConfig  # noqa: E402
from .modeling import GLMForConditionalGeneration, GLMForMultipleChoice, GLMModel, GLMPretrainedModel  # noqa: E402

__all__ = ["GLMConfig", "GLMModel", "GLMPretrainedModel", "GLMForConditionalGeneration", "GLMForMultipleChoice"]

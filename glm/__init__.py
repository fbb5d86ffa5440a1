"""glm-paddle: GLM (General Language Model, autoregressive blank infilling) on PaddlePaddle.

The model and what feeds it: configuration, modeling, decoding_cache, tokenization, inputs (the one input
builder), generation (decoding), generation_settings, bounds (every value's limits), checkpoint (reading
one), lora, loading (the one loader: model, tokenizer, adapter), lora_merge, convert; prediction
(checkpoint -> answers), errors (every user-facing error), files (crash-safe outputs), jsonl (row
reading), resumable_output. Subpackages: cli (what every entry script shares), training (the task
skeleton every finetuning and pretraining task plugs into), understanding (multiple choice, cloze
finetuning, LM evaluation), pretraining, serving.

Importing glm defines these names and does one thing besides (below): it picks MKL's fast kernels on AMD
CPUs, which must happen before Paddle's first matmul. Using every core is the entry scripts' choice
(glm.cli.process), not an import's.
"""

import os
import warnings
from typing import Optional

# Two warnings Paddle's import prints on every run, about its C++-extension builder, that no user of GLM
# can act on.
warnings.filterwarnings("ignore", message="No ccache found")
warnings.filterwarnings("ignore", message="Setuptools is replacing distutils")


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


# MKL reads MKL_DEBUG_CPU_TYPE at its first matmul: set here, on import, so that every way into the
# package (an entry script, a test, a user's own code) gets the fast kernels.
use_fast_mkl_kernels()

from .configuration import GLMConfig  # noqa: E402
from .modeling import GLMForConditionalGeneration, GLMForMultipleChoice, GLMModel, GLMPretrainedModel  # noqa: E402

__all__ = ["GLMConfig", "GLMModel", "GLMPretrainedModel", "GLMForConditionalGeneration", "GLMForMultipleChoice"]

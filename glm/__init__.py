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


# Paddle pins OMP_NUM_THREADS=1 at import when it is unset; GLM on 2 CPU cores runs ~1.4x faster with
# both. (paddle.distributed.launch sets OMP_NUM_THREADS=1 for each worker itself, so workers keep 1.)
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
if "paddle" not in sys.modules:
    with _without_paddle_thread_warning():  # a warning about data parallel on OpenBLAS: not our case
        import paddle  # noqa: F401

from .configuration import GLMConfig  # noqa: E402
from .modeling import GLMForConditionalGeneration, GLMForMultipleChoice, GLMModel, GLMPretrainedModel  # noqa: E402

__all__ = ["GLMConfig", "GLMModel", "GLMPretrainedModel", "GLMForConditionalGeneration", "GLMForMultipleChoice"]

"""glm-paddle: GLM (General Language Model, autoregressive blank infilling) on PaddlePaddle."""

import os
import warnings

# Noise Paddle's import prints on every run of every script, unrelated to anything the user can change.
warnings.filterwarnings("ignore", message="No ccache found")
warnings.filterwarnings("ignore", message="Setuptools is replacing distutils")

# Paddle pins OMP_NUM_THREADS=1 at import when it is unset; GLM on 2 CPU cores runs ~1.4x faster with
# both. (paddle.distributed.launch sets OMP_NUM_THREADS=1 for each worker itself, so workers keep 1.)
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

from .configuration import GLMConfig  # noqa: E402
from .modeling import GLMForConditionalGeneration, GLMForMultipleChoice, GLMModel, GLMPretrainedModel  # noqa: E402

__all__ = ["GLMConfig", "GLMModel", "GLMPretrainedModel", "GLMForConditionalGeneration", "GLMForMultipleChoice"]

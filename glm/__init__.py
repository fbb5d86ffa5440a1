"""glm-paddle: GLM (General Language Model, autoregressive blank infilling) on PaddlePaddle."""

import os
import warnings

# Noise Paddle's import prints on every run of every script, unrelated to anything the user can change.
warnings.filterwarnings("ignore", message="No ccache found")
warnings.filterwarnings("ignore", message="Setuptools is replacing distutils")

# Paddle pins OMP_NUM_THREADS=1 at import when it is unset; GLM on 2 CPU cores runs ~1.4x faster with
# both. Under `paddle.distributed.launch` each worker gets its share of the cores instead.
if "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PADDLE_TRAINERS_NUM", "1") or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // max(1, _workers)))

from .configuration import GLMConfig  # noqa: E402
from .modeling import GLMForConditionalGeneration, GLMModel, GLMPretrainedModel  # noqa: E402

__all__ = ["GLMConfig", "GLMModel", "GLMPretrainedModel", "GLMForConditionalGeneration"]

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import glm  # noqa: E402,F401  (sets OMP_NUM_THREADS before paddle is imported)
import paddle  # noqa: E402
import pytest  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def tiny_config_kwargs(**overrides):
    """A GLM small enough for a test to run in well under a second."""
    kwargs = dict(
        num_layers=2,
        vocab_size=96,
        hidden_size=32,
        num_attention_heads=4,
        max_sequence_length=64,
        embedding_dropout_prob=0.0,
        attention_dropout_prob=0.0,
        output_dropout_prob=0.0,
        output_predict=True,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_model():
    paddle.seed(1234)
    model = glm.GLMForConditionalGeneration(glm.GLMConfig(**tiny_config_kwargs()))
    model.eval()
    return model


def shared_path(*parts):
    """A file from ../shared; required under CI, a skip only on a developer machine without it."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        if os.environ.get("CI", "").lower() == "true":
            raise FileNotFoundError(f"{path} is required when CI=true")
        pytest.skip(f"{path} not present (../shared is absent and CI is not set)")
    return path

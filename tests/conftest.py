import os
import shutil
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import glm  # noqa: E402
import paddle  # noqa: E402
import pytest  # noqa: E402
from glm.cli.process import use_all_cores  # noqa: E402

use_all_cores()  # as every entry script does: the in-process runs of the tests as fast as the commands

SHARED = os.path.join(os.path.dirname(ROOT), "shared")

# A suite started in the background by a non-interactive shell (`(pytest &)`) inherits SIGINT ignored;
# Python then installs no KeyboardInterrupt handler, here or in the scripts the tests run, and the Ctrl-C
# tests (their processes send themselves SIGINT) saw nothing happen. The tests run as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture
def caplog(caplog):
    """pytest's caplog with PaddleNLP's log records too: its logger does not propagate to the root logger,
    where caplog listens."""
    from paddlenlp.utils.log import logger

    listening = not logger.logger.propagate  # where it propagates, caplog sees the records already
    if listening:
        logger.logger.addHandler(caplog.handler)
    yield caplog
    if listening:
        logger.logger.removeHandler(caplog.handler)


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory):
    """`pip install --target DIR .` of a copy of the checkout's package files (so the build leaves nothing
    in the checkout); returns DIR, to be put on PYTHONPATH in a process started outside the checkout."""
    source = tmp_path_factory.mktemp("package-source")
    for name in ("pyproject.toml", "requirements.txt", "requirements-test.txt", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source)
    shutil.copytree(os.path.join(ROOT, "glm"), source / "glm", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("site")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return target


def run_outside_checkout(code: str, cwd, site, timeout=600):
    """`python -c code` in `cwd` with only the installed package `site` importable (not the checkout)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=str(cwd), env=dict(env, PYTHONPATH=str(site)),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip

"""glm.lora_merge / tools/merge_lora.py: base + trained adapter -> a plain checkpoint with the same logits."""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
from conftest import ROOT, tiny_config_kwargs
from test_modeling import glm_inputs, relative_error, train_steps

from glm import GLMConfig, GLMForConditionalGeneration
from glm.errors import AdapterError, LoRAMergeError
from glm.lora import apply_lora
from glm.lora_merge import merge_lora_checkpoint

TARGETS = [".*query_key_value.*", ".*attention.dense.*", ".*mlp.*"]


def save_base(directory, seed=7, **overrides):
    paddle.seed(seed)
    GLMForConditionalGeneration(GLMConfig(**tiny_config_kwargs(**overrides))).save_pretrained(directory)
    # Stand-ins for a tokenizer: merging must copy them unchanged.
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "GLMChineseTokenizer"}')
    (directory / "cog-pretrain.model").write_bytes(b"\x00sentencepiece stand-in\xff")


def logits(model):
    model.eval()
    x = glm_inputs(model.config.vocab_size)
    return model(x["input_ids"], x["position_ids"], x["sep"], return_dict=True).logits.numpy()


@pytest.fixture
def base_and_adapter(tmp_path):
    """A saved base, and an adapter trained on it for two steps (so lora_B is no longer zero), with the
    adapter's unmerged logits."""
    save_base(tmp_path / "base")
    base = GLMForConditionalGeneration.from_pretrained(tmp_path / "base")
    lora_model = apply_lora(base, rank=4, alpha=8, target_modules=TARGETS)
    x = glm_inputs(lora_model.model.config.vocab_size)
    train_steps(lora_model, x, steps=2)
    assert all(np.abs(p.numpy()).max() > 0 for n, p in lora_model.named_parameters() if "lora_B" in n)
    lora_model.save_pretrained(tmp_path / "adapter")
    lora_model.eval()
    unmerged = lora_model(x["input_ids"], x["position_ids"], x["sep"], return_dict=True).logits.numpy()
    return tmp_path / "base", tmp_path / "adapter", unmerged


def test_merged_checkpoint_gives_the_adapters_logits(tmp_path, base_and_adapter):
    base, adapter, unmerged = base_and_adapter
    merge_lora_checkpoint(str(base), str(adapter), str(tmp_path / "merged"))

    merged = GLMForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert relative_error(logits(merged), unmerged) < 1e-5
    # and the adapter did change something
    assert relative_error(logits(GLMForConditionalGeneration.from_pretrained(base)), unmerged) > 1e-3
    saved = paddle.load(str(tmp_path / "merged" / "model_state.pdparams"), return_numpy=True)
    assert sorted(saved) == sorted(paddle.load(str(base / "model_state.pdparams"), return_numpy=True))  # no lora_ keys
    for name in ("tokenizer_config.json", "cog-pretrain.model"):
        assert (tmp_path / "merged" / name).read_bytes() == (base / name).read_bytes()


def test_library_merge_is_w_plus_a_b_times_scaling(tmp_path, base_and_adapter):
    base, adapter, _ = base_and_adapter
    merge_lora_checkpoint(str(base), str(adapter), str(tmp_path / "merged"))
    name = "glm.transformer.layers.1.mlp.dense_4h_to_h"
    lora = paddle.load(str(adapter / "lora_model_state.pdparams"), return_numpy=True)
    before = paddle.load(str(base / "model_state.pdparams"), return_numpy=True)[name + ".weight"]
    after = paddle.load(str(tmp_path / "merged" / "model_state.pdparams"), return_numpy=True)[name + ".weight"]
    expected = before + lora[name + ".lora_A"] @ lora[name + ".lora_B"] * (8 / 4)  # alpha / rank
    np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-7)


def test_bfloat16_adapter_merges_on_cpu_in_float32(tmp_path):
    # Trained in bfloat16 on a GPU, merged on a CPU (which has no bfloat16 matmul).
    save_base(tmp_path / "base")
    model = GLMForConditionalGeneration.from_pretrained(tmp_path / "base")
    model.to(dtype="bfloat16")
    lora_model = apply_lora(model, rank=4, alpha=8, target_modules=TARGETS)
    for name, param in lora_model.named_parameters():
        if "lora_B" in name:
            param.set_value(paddle.full(param.shape, 0.05, dtype=param.dtype))  # as if trained
    lora_model.save_pretrained(tmp_path / "adapter")
    merge_lora_checkpoint(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"))

    name = "glm.transformer.layers.0.mlp.dense_h_to_4h"
    lora = paddle.load(str(tmp_path / "adapter" / "lora_model_state.pdparams"))
    lora_a, lora_b = (lora[name + suffix].astype("float32").numpy() for suffix in (".lora_A", ".lora_B"))
    before = paddle.load(str(tmp_path / "base" / "model_state.pdparams"), return_numpy=True)[name + ".weight"]
    after = paddle.load(str(tmp_path / "merged" / "model_state.pdparams"), return_numpy=True)[name + ".weight"]
    assert after.dtype == np.float32
    np.testing.assert_allclose(after, before + lora_a @ lora_b * (8 / 4), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "overrides, drop_adapter_config, message",
    [
        (dict(hidden_size=64), False, r"a different GLM: hidden_size 32 \(the adapter's base\) vs 64 \(this base\)"),
        (dict(num_layers=3), False, r"a different GLM: num_layers 2 \(the adapter's base\) vs 3 \(this base\)"),
        # Without the base config.json LoRAModel.save_pretrained writes beside the adapter: weights decide.
        (dict(hidden_size=64), True, r"holds .*query_key_value.lora_A of shape \[32, 4\], the base needs \[64, 4\]"),
        (dict(num_layers=3), True, "has no glm.transformer.layers.2.attention.query_key_value.lora_A"),
        (dict(num_layers=1), True, "holds glm.transformer.layers.1.* which the base does not have"),
    ],
)
def test_adapter_on_a_different_base_fails_clearly(tmp_path, base_and_adapter, overrides, drop_adapter_config, message):
    _, adapter, _ = base_and_adapter
    if drop_adapter_config:
        os.remove(adapter / "config.json")
    save_base(tmp_path / "other", **overrides)
    with pytest.raises(AdapterError, match=message) as error:
        merge_lora_checkpoint(str(tmp_path / "other"), str(adapter), str(tmp_path / "merged"))
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "merged")


def test_missing_adapter_files_fail_clearly(tmp_path, base_and_adapter):
    base, adapter, _ = base_and_adapter
    shutil.copytree(adapter, tmp_path / "no_weights")
    os.remove(tmp_path / "no_weights" / "lora_model_state.pdparams")
    with pytest.raises(AdapterError, match="no lora_model_state.pdparams"):
        merge_lora_checkpoint(str(base), str(tmp_path / "no_weights"), str(tmp_path / "merged"))
    with pytest.raises(LoRAMergeError, match="no config.json"):
        merge_lora_checkpoint(str(tmp_path / "nowhere"), str(adapter), str(tmp_path / "merged"))


def test_cli_reports_a_mismatched_base_in_one_line_and_exits_2(tmp_path, base_and_adapter):
    _, adapter, _ = base_and_adapter
    save_base(tmp_path / "other", hidden_size=64)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "merge_lora.py"), "--model_name_or_path", str(tmp_path / "other"),
         "--lora_path", str(adapter), "--output_dir", str(tmp_path / "merged")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: adapter ")


def test_cli_removes_a_killed_runs_leftover_and_logs_at_warning(tmp_path, base_and_adapter, capsys, caplog):
    from paddlenlp.utils.log import logger

    base, adapter, unmerged = base_and_adapter
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f"merged.partial-{dead.pid}"  # what a kill -9 during a merge leaves
    leftover.mkdir()
    spec = importlib.util.spec_from_file_location("merge_lora_tool", os.path.join(ROOT, "tools", "merge_lora.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    logger.set_level("INFO")  # as PaddleNLP starts
    tool.main(["--model_name_or_path", str(base), "--lora_path", str(adapter), "--output_dir", str(tmp_path / "merged")])
    assert not leftover.exists() and f"removing {leftover}, left by a run that was killed" in capsys.readouterr().out
    assert not [record for record in caplog.records if record.levelname == "INFO"]
    assert relative_error(logits(GLMForConditionalGeneration.from_pretrained(tmp_path / "merged")), unmerged) < 1e-5

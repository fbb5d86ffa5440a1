"""The memory plan (glm/memory): its parameter count is the model's, its estimate holds against what a fresh
finetune_generation.py and predict_generation.py process uses (a wider margin than bench/memory.py's table),
a run that cannot fit is refused before loading, and tools/plan_memory.py plans a THUDM model offline."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_config_kwargs
from test_finetune import micro_data, micro_model, run  # noqa: F401  (fixtures)

import glm
import glm.memory.plan
import glm.training.task
from glm.memory.estimate import MIB, DecodingLoad, TrainingLoad, estimate_decoding, estimate_training
from glm.memory.plan import suggestions, training_plan
from glm.memory.shapes import BUILTIN_SHAPES, ModelShape

# bench/memory.py: the same runs as the benchmark's
_spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(ROOT, "bench", "memory.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("overrides", [{}, dict(num_layers=3, hidden_size=48, num_attention_heads=3, vocab_size=200)])
def test_the_planned_parameters_are_the_models(overrides):
    config = glm.GLMConfig(**tiny_config_kwargs(**overrides))
    model = glm.GLMForConditionalGeneration(config)
    shape = ModelShape(config.num_layers, config.hidden_size, config.num_attention_heads, config.vocab_size,
                       config.max_sequence_length)
    assert shape.parameters() == sum(int(p.numel()) for p in model.parameters())


def test_the_estimated_step_is_what_paddle_allocates(tmp_path):
    """Paddle's CPU allocator peak of real training steps (the model's own forward, backward and AdamW, the
    gradients released as GLMTrainer releases them) against the estimate's tensors, in a fresh process."""
    code = """
import json, sys, numpy as np, paddle, glm
from paddle.base import core
paddle.seed(0)
model = glm.GLMForConditionalGeneration(glm.GLMConfig(num_layers=3, hidden_size=256, num_attention_heads=4,
    vocab_size=8000, max_sequence_length=512, output_predict=True))
model.train()
opt = paddle.optimizer.AdamW(1e-4, parameters=model.parameters())
b, l, s = 4, 192, 64
ids = paddle.to_tensor(np.random.default_rng(0).integers(5, 8000, (b, l)))
pos = paddle.to_tensor(np.stack([np.stack([np.arange(l), np.zeros(l, int)])] * b))
mask = np.zeros((b, l), "int64"); mask[:, l - s:] = 1
for _ in range(3):
    out = model(ids, pos, paddle.to_tensor(np.full([b], l - s)), labels=ids, loss_mask=paddle.to_tensor(mask), return_dict=True)
    out.loss.backward(); opt.step(); opt.clear_grad(set_to_zero=False)
print(core.host_memory_stat_peak_value("Allocated", 0))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = int(result.stdout.split()[-1])
    estimate = estimate_training(TrainingLoad(ModelShape(3, 256, 4, 8000, 512), 4, 192, 64))
    tensors = estimate.peak - estimate.parts["runtime"] - estimate.parts["allocator_slack"]
    assert tensors == pytest.approx(measured, rel=0.05), (tensors / MIB, measured / MIB)


@pytest.mark.parametrize("kind", ["train", "predict"])
def test_a_run_uses_what_it_planned(tmp_path, kind):
    """A whole run in its own process, as bench/memory.py measures it (its table: within 3 %)."""
    if kind == "train":
        estimated, measured, _ = bench.train(str(tmp_path), 2, 128, 4, 96, 32, False, False)
    else:
        estimated, measured, _ = bench.decode(str(tmp_path), 2, 256, 4, 96, 16, 3)
    assert estimated == pytest.approx(measured, rel=0.15), (estimated, measured)


def test_a_run_that_cannot_fit_is_refused_before_loading(micro_model, micro_data, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(glm.memory.plan, "available_memory_bytes", lambda: 1)
    loaded = []
    monkeypatch.setattr(glm.training.task, "load_for_training", lambda *a, **k: loaded.append(1))
    with pytest.raises(SystemExit) as exit_info:
        run(micro_model, micro_data, tmp_path / "out", "--do_train", "--max_steps", "1")
    assert exit_info.value.code == 2 and not loaded
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: this run needs about ") and "GiB are available" in line
    assert "--ignore_memory_check true runs it anyway" in line
    assert not (tmp_path / "out").exists()


def test_the_check_can_be_skipped_and_runs_record_both_peaks(micro_model, micro_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(glm.memory.plan, "available_memory_bytes", lambda: 1)
    run(micro_model, micro_data, tmp_path, "--do_train", "--max_steps", "1", "--ignore_memory_check", "true")
    results = json.loads((tmp_path / "train_results.json").read_text())
    assert results["estimated_peak_memory_mib"] > 0 and results["peak_memory_mib"] > results["peak_tensor_memory_mib"] > 0


def test_suggestions_put_what_keeps_the_result_first():
    plan = training_plan(TrainingLoad(BUILTIN_SHAPES["THUDM/glm-large-chinese"], 16, 768, 160, gpu=True, devices=4))
    changes = suggestions(plan, int(plan.estimate.peak * 0.8))
    assert changes and all(change.estimate.peak <= plan.estimate.peak * 0.8 for change in changes)
    assert changes[0].keeps_result
    # Decoding: fewer sources at once.
    decoding = glm.memory.plan.decoding_plan(DecodingLoad(BUILTIN_SHAPES["THUDM/glm-large-chinese"], 64, 608, 160, 5))
    assert suggestions(decoding, int(decoding.estimate.peak * 0.6))[0].flags.startswith("--batch_size")
    assert estimate_decoding(DecodingLoad(BUILTIN_SHAPES["THUDM/glm-large-chinese"], 8, 608, 160, 5)).peak < decoding.estimate.peak


def test_the_planner_plans_thudms_10b_offline_and_writes_json(tmp_path):
    """THUDM/GLM#46: 4 x V100 32 GB do not hold a full fp16 finetune of glm-10b-chinese; 16 do, sharded."""
    def plan(*flags):
        output = tmp_path / "plan.json"
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "plan_memory.py"), "--task", "finetune", "--gpu", "true",
             "--device_memory", "32", "--model_name_or_path", "THUDM/glm-10b-chinese", "--fp16", "true",
             "--fp16_opt_level", "O2", "--recompute", "true", "--per_device_train_batch_size", "1",
             "--src_length", "512", "--tgt_length", "64", "--do_train", "--output_file", str(output), *flags],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(output.read_text()), result.stderr

    four, printed = plan("--devices", "4", "--sharding", "stage2")
    assert not four["fits"] and four["per_device_gib"] > 32 and "does NOT fit" in printed
    assert {"weights", "optimizer", "activations"} <= set(four["parts_mib"]) and four["suggestions"]
    sixteen, _ = plan("--devices", "16", "--sharding", "stage3")
    assert sixteen["fits"]

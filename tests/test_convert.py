"""glm.convert: THUDM HF checkpoints (PyTorch layout) -> our / PaddleNLP's directory format.

The HF state dicts are written here by hand from THUDM's modeling_glm.py (names, torch [out, in]
layouts), not derived from the converter's tables; the .bin reader is checked against a file real torch
wrote (tests/fixtures/make_torch_fixture.py).
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import paddle
import pytest
from conftest import ROOT, shared_path, tiny_config_kwargs
from paddlenlp.transformers import GLMChineseTokenizer
from paddlenlp.transformers import GLMForConditionalGeneration as PaddleNLPGLM
from safetensors import safe_open
from safetensors.numpy import save_file
from test_modeling import glm_inputs, relative_error

from glm import GLMConfig, GLMForConditionalGeneration
import glm.convert
import glm.files
from glm.errors import ConversionError
from glm.convert import _bfloat16_to_float32, convert_checkpoint, read_safetensors, read_torch_bin
from glm.files import CRASH_AT_VARIABLE, CRASH_SIGNAL_VARIABLE

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny_torch_glm")
# The torch Linear weights ([out, in]) of THUDM's GLMBlock.
TORCH_LINEAR_WEIGHTS = (
    "attention.query_key_value.weight",
    "attention.dense.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)


def hf_config(**overrides):
    """THUDM's config.json fields (glm-large-chinese's, shrunk)."""
    kwargs = tiny_config_kwargs(**overrides)
    return dict(
        kwargs,
        architectures=["GLMModel"],
        auto_map={"AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration"},
        model_type="glm",
        checkpoint_activations=False,
        checkpoint_num_layers=1,
        parallel_output=True,
        relative_encoding=False,
        block_position_encoding=True,
        spell_length=None,
        spell_func="lstm",
        attention_scale=1.0,
        torch_dtype="float32",
    )


def hf_state_dict(config, seed=0):
    """Random tensors under THUDM's released names (GLMModel's), in torch layouts."""
    rng = np.random.default_rng(seed)
    h, rows = config["hidden_size"], config["max_sequence_length"] + 1
    shapes = {
        "word_embeddings.weight": (config["vocab_size"], h),
        "transformer.position_embeddings.weight": (rows, h),
        "transformer.block_position_embeddings.weight": (rows, h),
    }
    for i in range(config["num_layers"]):
        for name, shape in {
            "input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
            "attention.query_key_value.weight": (3 * h, h), "attention.query_key_value.bias": (3 * h,),
            "attention.dense.weight": (h, h), "attention.dense.bias": (h,),
            "post_attention_layernorm.weight": (h,), "post_attention_layernorm.bias": (h,),
            "mlp.dense_h_to_4h.weight": (4 * h, h), "mlp.dense_h_to_4h.bias": (4 * h,),
            "mlp.dense_4h_to_h.weight": (h, 4 * h), "mlp.dense_4h_to_h.bias": (h,),
        }.items():  # fmt: skip
            shapes[f"transformer.layers.{i}.{name}"] = shape
    shapes.update({"transformer.final_layernorm.weight": (h,), "transformer.final_layernorm.bias": (h,)})
    state = {}
    for name, shape in shapes.items():
        mean = 1.0 if "layernorm.weight" in name else 0.0
        state[name] = rng.normal(mean, 0.3, shape).astype("float32")
    return state


def paddle_state_dict(hf_state):
    """What the converter must produce, by hand: `glm.` names, Linear weights transposed."""
    return {"glm." + name: (w.T if name.endswith(TORCH_LINEAR_WEIGHTS) else w) for name, w in hf_state.items()}


def write_hf_checkpoint(directory, config, state, shards=1, prefix=""):
    """A THUDM-style HF directory with safetensors weights, sharded with an index json when shards > 1."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as file:
        json.dump(config, file)
    state = {prefix + name: w for name, w in state.items()}
    if shards == 1:
        save_file(state, os.path.join(directory, "model.safetensors"))
        return
    names, weight_map = list(state), {}
    for shard in range(shards):
        filename = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        save_file({name: state[name] for name in names[shard::shards]}, os.path.join(directory, filename))
        weight_map.update({name: filename for name in names[shard::shards]})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as file:
        json.dump({"metadata": {"total_size": sum(w.nbytes for w in state.values())}, "weight_map": weight_map}, file)


def convert(input_dir, output_dir, **kwargs):
    lines = []
    convert_checkpoint(str(input_dir), str(output_dir), report=lines.append, **kwargs)
    return lines


def logits(model, vocab_size):
    model.eval()
    x = glm_inputs(vocab_size)
    # the 4-D mask: PaddleNLP cannot take the 1-D sep form
    return model(x["input_ids"], x["position_ids"], x["mask_4d"], return_dict=True).logits.numpy()


@pytest.mark.parametrize("shards, prefix", [(1, ""), (3, "glm.")])
def test_safetensors_checkpoint_converts_to_exact_weights_and_same_logits(tmp_path, shards, prefix):
    # prefix "": THUDM's released files (GLMModel names); "glm.": saved from HF's GLMForConditionalGeneration.
    config = hf_config()
    state = hf_state_dict(config)
    write_hf_checkpoint(tmp_path / "hf", config, state, shards=shards, prefix=prefix)
    convert(tmp_path / "hf", tmp_path / "out")

    expected = paddle_state_dict(state)
    saved = paddle.load(str(tmp_path / "out" / "model_state.pdparams"), return_numpy=True)
    assert sorted(saved) == sorted(expected)
    for name, weight in expected.items():
        assert saved[name].dtype == np.float32
        np.testing.assert_array_equal(saved[name], weight, err_msg=name)

    direct = GLMForConditionalGeneration(GLMConfig(**tiny_config_kwargs()))
    direct.set_state_dict(expected)
    converted = GLMForConditionalGeneration.from_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(logits(converted, config["vocab_size"]), logits(direct, config["vocab_size"]))


def test_converted_checkpoint_loads_in_paddlenlp_without_missing_or_unexpected_keys(tmp_path):
    config = hf_config()
    write_hf_checkpoint(tmp_path / "hf", config, hf_state_dict(config))
    convert(tmp_path / "hf", tmp_path / "out")
    saved = paddle.load(str(tmp_path / "out" / "model_state.pdparams"), return_numpy=True)
    theirs = PaddleNLPGLM.from_pretrained(tmp_path / "out")
    assert sorted(saved) == sorted(theirs.state_dict())
    ours = GLMForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert relative_error(logits(theirs, config["vocab_size"]), logits(ours, config["vocab_size"])) < 1e-5


def test_config_maps_thudm_keys_and_drops_hf_only_ones(tmp_path):
    config = hf_config(pad_token_id=50000)  # THUDM's <|endoftext|>
    write_hf_checkpoint(tmp_path / "hf", config, hf_state_dict(config))
    lines = convert(tmp_path / "hf", tmp_path / "out")
    with open(tmp_path / "out" / "config.json") as file:
        written = json.load(file)
    assert written["architectures"] == ["GLMForConditionalGeneration"]
    assert {"auto_map", "checkpoint_activations", "torch_dtype", "dtype"}.isdisjoint(written)
    assert written["pad_token_id"] == config["pad_token_id"]
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length"):
        assert written[key] == config[key]
    assert any("dropped HF-only keys auto_map, checkpoint_activations, torch_dtype" in line for line in lines)


def test_torch_bin_reader_equals_safetensors_written_by_torch():
    from_bin = dict(read_torch_bin(os.path.join(FIXTURE, "pytorch_model.bin")))
    from_safetensors = dict(read_safetensors(os.path.join(FIXTURE, "model.safetensors")))
    assert sorted(from_bin) == sorted(from_safetensors)
    for name, array in from_bin.items():
        assert array.dtype == from_safetensors[name].dtype and array.shape == from_safetensors[name].shape, name
        np.testing.assert_array_equal(array, from_safetensors[name], err_msg=name)
    # Our safetensors reader against the package's (which cannot read bfloat16).
    with open(os.path.join(FIXTURE, "model.safetensors"), "rb") as file:
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    dtypes = {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    assert {"F32", "F16", "BF16"} <= set(dtypes.values())
    with safe_open(os.path.join(FIXTURE, "model.safetensors"), framework="np") as file:
        for name, dtype in dtypes.items():
            if dtype != "BF16":
                np.testing.assert_array_equal(from_safetensors[name], file.get_tensor(name), err_msg=name)


def test_bfloat16_widens_exactly():
    bits = np.array([0x3F80, 0xC020, 0x0000, 0x7F80, 0x3DCD], dtype=np.uint16)
    expected = np.array([1.0, -2.5, 0.0, np.inf, 0.10009765625], dtype=np.float32)
    np.testing.assert_array_equal(_bfloat16_to_float32(bits), expected)


def test_torch_bin_checkpoint_converts_like_its_safetensors_twin(tmp_path):
    for fmt, weights in (("bin", "pytorch_model.bin"), ("safetensors", "model.safetensors")):
        os.makedirs(tmp_path / fmt)
        for name in ("config.json", weights):
            shutil.copy(os.path.join(FIXTURE, name), tmp_path / fmt)
        convert(tmp_path / fmt, tmp_path / f"{fmt}_out")
    from_bin = paddle.load(str(tmp_path / "bin_out" / "model_state.pdparams"), return_numpy=True)
    from_safetensors = paddle.load(str(tmp_path / "safetensors_out" / "model_state.pdparams"), return_numpy=True)
    assert sorted(from_bin) == sorted(from_safetensors)
    for name, array in from_bin.items():
        np.testing.assert_array_equal(array, from_safetensors[name], err_msg=name)
    # float16 stays float16, bfloat16 (layer 1's MLP) is widened to float32; the model builds in float32.
    assert from_bin["glm.transformer.layers.0.mlp.dense_h_to_4h.weight"].dtype == np.float16
    assert from_bin["glm.transformer.layers.1.mlp.dense_h_to_4h.weight"].dtype == np.float32
    model = GLMForConditionalGeneration.from_pretrained(tmp_path / "bin_out")
    assert model.glm.transformer.layers[0].mlp.dense_h_to_4h.weight.dtype == paddle.float32
    np.testing.assert_array_equal(
        model.glm.transformer.layers[0].mlp.dense_h_to_4h.weight.numpy(),
        from_bin["glm.transformer.layers.0.mlp.dense_h_to_4h.weight"].astype("float32"),
    )


def test_dtype_option_stores_every_weight_in_that_dtype(tmp_path):
    os.makedirs(tmp_path / "hf")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(FIXTURE, name), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "out", dtype="float16")
    saved = paddle.load(str(tmp_path / "out" / "model_state.pdparams"), return_numpy=True)
    assert {str(array.dtype) for array in saved.values()} == {"float16"}


def test_chinese_tokenizer_is_written_in_paddlenlp_form(tmp_path):
    config = hf_config()
    write_hf_checkpoint(tmp_path / "hf", config, hf_state_dict(config))
    shutil.copy(shared_path("tokenizers", "glm-chinese", "cog-pretrain.model"), tmp_path / "hf")
    # THUDM's tokenizer_config.json (another special-token order, an auto_map into its python) is ignored.
    with open(tmp_path / "hf" / "tokenizer_config.json", "w") as file:
        json.dump({"additional_special_tokens": ["<|startofpiece|>", "<|endofpiece|>", "[gMASK]", "[sMASK]"]}, file)
    convert(tmp_path / "hf", tmp_path / "out")
    tokenizer = GLMChineseTokenizer.from_pretrained(tmp_path / "out")
    tokens = ["<|endoftext|>", "[MASK]", "<|startofpiece|>", "<|endofpiece|>", "[sMASK]", "[gMASK]"]
    assert tokenizer.convert_tokens_to_ids(tokens) == [50000, 50003, 50006, 50007, 50008, 50009]


OVERLAP = dict(vocab_size=50048, hidden_size=8, num_attention_heads=2, num_layers=1, max_sequence_length=8)


def overlap_checkpoint(directory, rows_identical, ban):
    config = hf_config(**OVERLAP)
    if ban:
        config["bad_words_id"] = [50009]  # as THUDM's glm-10b-chinese config.json writes it
    state = hf_state_dict(config)
    if rows_identical:
        state["word_embeddings.weight"][50009] = state["word_embeddings.weight"][50007]
    write_hf_checkpoint(directory, config, state)
    return state["word_embeddings.weight"]


@pytest.mark.parametrize(
    "rows_identical, ban, mode, expect_ban, expect_identical, message",
    [
        (True, True, "keep", True, True, "kept THUDM's handling"),  # THUDM's glm-10b-chinese release
        (False, False, "share", True, True, "row copied"),  # a glm-10b-chinese that lost THUDM's copy and ban
        (False, False, "keep", False, False, "not glm-10b-chinese"),  # any other model
        (True, False, "keep", False, True, "rerun with --eop_gmask_overlap share"),  # half-handled: say so
    ],
)
def test_eop_gmask_overlap_option(tmp_path, rows_identical, ban, mode, expect_ban, expect_identical, message):
    source = overlap_checkpoint(tmp_path / "hf", rows_identical, ban)
    lines = convert(tmp_path / "hf", tmp_path / "out", eop_gmask_overlap=mode)
    assert any(line.startswith("eop/[gMASK]") and message in line for line in lines), lines
    saved = paddle.load(str(tmp_path / "out" / "model_state.pdparams"), return_numpy=True)
    embeddings = saved["glm.word_embeddings.weight"]
    assert np.array_equal(embeddings[50009], embeddings[50007]) == expect_identical
    others = np.ones(len(source), bool)
    others[50009] = False
    np.testing.assert_array_equal(embeddings[others], source[others])  # only row 50009 may change
    with open(tmp_path / "out" / "config.json") as file:
        written = json.load(file)
    # The key THUDM's and PaddleNLP's glm-10b-chinese configs use, and glm.generation reads.
    assert written.get("bad_words_id") == ([50009] if expect_ban else None)
    assert getattr(GLMConfig.from_pretrained(tmp_path / "out"), "bad_words_id", None) == written.get("bad_words_id")


def break_checkpoint(directory, how):
    os.makedirs(directory)
    config = hf_config()
    state = hf_state_dict(config)
    if how == "no_config":
        write_hf_checkpoint(directory, config, state)
        os.remove(os.path.join(directory, "config.json"))
    elif how == "no_weights":
        write_hf_checkpoint(directory, config, state)
        os.remove(os.path.join(directory, "model.safetensors"))
    elif how == "missing_shard":
        write_hf_checkpoint(directory, config, state, shards=2)
        os.remove(os.path.join(directory, "model-00002-of-00002.safetensors"))
    elif how == "chatglm":
        write_hf_checkpoint(directory, dict(config, architectures=["ChatGLMModel"], model_type="chatglm"), state)
    elif how == "shape":
        write_hf_checkpoint(directory, dict(config, vocab_size=100), state)
    elif how == "unexpected":
        write_hf_checkpoint(directory, config, dict(state, **{"lm_head.weight": state["word_embeddings.weight"]}))
    elif how == "missing_tensor":
        del state["transformer.final_layernorm.bias"]
        write_hf_checkpoint(directory, config, state)
    elif how == "legacy_bin":
        write_hf_checkpoint(directory, config, {})
        os.remove(os.path.join(directory, "model.safetensors"))
        with open(os.path.join(directory, "pytorch_model.bin"), "wb") as file:
            pickle.dump({"word_embeddings.weight": state["word_embeddings.weight"]}, file)
    elif how == "corrupt_bin":
        # The fixture with its first storage cut short: as_strided must not be allowed to read past it.
        shutil.copy(os.path.join(FIXTURE, "config.json"), directory)
        with zipfile.ZipFile(os.path.join(FIXTURE, "pytorch_model.bin")) as source:
            with zipfile.ZipFile(os.path.join(directory, "pytorch_model.bin"), "w") as archive:
                for entry in source.namelist():
                    data = source.read(entry)
                    archive.writestr(entry, data[:8] if entry.endswith("/data/0") else data)
    elif how == "unsafe_bin":
        # A pickle that would call os.system: the reader must refuse the global, never call it.
        write_hf_checkpoint(directory, config, {})
        os.remove(os.path.join(directory, "model.safetensors"))
        with zipfile.ZipFile(os.path.join(directory, "pytorch_model.bin"), "w") as archive:
            archive.writestr("archive/data.pkl", pickle.dumps({"word_embeddings.weight": os.system}))


@pytest.mark.parametrize(
    "how, message",
    [
        ("no_config", "no config.json"),
        ("no_weights", "no weights"),
        ("missing_shard", "model-00002-of-00002.safetensors is missing"),
        ("chatglm", "unknown architecture ChatGLMModel"),
        ("shape", r"word_embeddings.weight has shape \[96, 32\] but config.json .* needs \[100, 32\]"),
        ("unexpected", "lm_head.weight has no place in GLM's LM"),
        ("missing_tensor", "lacks 1 GLM weights, e.g. glm.transformer.final_layernorm.bias"),
        ("legacy_bin", "not a torch zip checkpoint"),
        ("corrupt_bin", "a tensor reaches past its storage 0"),
        ("unsafe_bin", r"pickles \w+\.system, which the torch-free reader does not rebuild"),
    ],
)
def test_bad_checkpoints_give_one_line_errors(tmp_path, how, message):
    break_checkpoint(tmp_path / "hf", how)
    with pytest.raises(ConversionError, match=message) as error:
        convert(tmp_path / "hf", tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "out")  # nothing half-written


def test_cli_prints_error_and_exits_2_without_traceback(tmp_path):
    config = hf_config()
    write_hf_checkpoint(tmp_path / "hf", config, hf_state_dict(config))
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "something").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "glm.convert", "--input_dir", tmp_path / "hf", "--output_dir", tmp_path / "out"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: {tmp_path / 'out'} exists and is not empty" in result.stderr.splitlines()[-1]


def test_a_stopped_conversion_leaves_no_torn_output_and_a_killed_ones_leftover_goes(tmp_path, monkeypatch, capsys, caplog):
    from paddlenlp.utils.log import logger

    config = hf_config()
    write_hf_checkpoint(tmp_path / "hf", config, hf_state_dict(config))
    argv = ["--input_dir", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "out")]
    monkeypatch.setenv(CRASH_AT_VARIABLE, "staged:before-rename")  # every file written, not yet renamed
    monkeypatch.setenv(CRASH_SIGNAL_VARIABLE, "INT")
    glm.files._crash_counts.clear()
    with pytest.raises(SystemExit) as exit_info:
        glm.convert.main(argv)
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip().splitlines()[-1] == "stopped by Ctrl-C (SIGINT)"
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no output, and no staged copy
    monkeypatch.delenv(CRASH_AT_VARIABLE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"out.partial-{dead.pid}").mkdir()  # what a kill -9 leaves
    (tmp_path / f"out.partial-{dead.pid}" / "model_state.pdparams").write_bytes(b"torn")
    logger.set_level("INFO")  # as PaddleNLP starts: the run itself brings it to --log_level's warning
    glm.convert.main(argv)
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]
    assert f"removing {tmp_path}/out.partial-{dead.pid}, left by a run that was killed" in capsys.readouterr().out
    assert not [record for record in caplog.records if record.levelname == "INFO"]
    GLMForConditionalGeneration.from_pretrained(str(tmp_path / "out"))

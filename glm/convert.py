"""Convert a THUDM HuggingFace GLM checkpoint (PyTorch) into this project's (and PaddleNLP's) directory format.

    python -m glm.convert --input_dir glm-10b-chinese --output_dir glm-10b-chinese-paddle

Input: THUDM's `config.json` with HF names, the weights as `model.safetensors` or `pytorch_model.bin`
(either possibly sharded with its `*.index.json`), and for the Chinese models `cog-pretrain.model`.
Output: `config.json` (GLMConfig), `model_state.pdparams` (PaddleNLP parameter names, Paddle layouts) and
the PaddleNLP `GLMChineseTokenizer` files. torch is not needed: `.bin` files are read by a restricted
unpickler that rebuilds tensors as numpy arrays (PaddleNLP's own `convert_from_torch` for GLM fails on
an ImportError and knows nothing of glm-10b-chinese's shared eop/[gMASK] id).

Precision: float32 and float16 weights keep their dtype, bfloat16 becomes float32 (numpy has no bfloat16;
the widening is exact), unless --dtype asks for one. The config records no dtype, so `from_pretrained`
builds float32 and casts on load; pass `dtype="float16"` there for half precision on a GPU.

Memory: tensors are read one at a time (memory-mapped for safetensors, one zip entry for .bin), converted
and kept, so shard sizes do not matter; the output is pickled with protocol 5, which writes numpy arrays
without copying them (the protocol 4 of `paddle.save` copies each array while writing: twice the memory).
Peak = ~0.5 GiB of Python/Paddle + the converted model + under 2 GiB of copies of the largest tensor (the
50048 x 4096 word embeddings). glm-10b-chinese (9.9e9 parameters) in float16: ~18.4 + 0.5 + 0.8 GiB, under
24 GiB. A float32 10B checkpoint would need 37 GiB: convert it with `--dtype float16`. (Measured on a
glm-large-sized float16 .bin, 356M parameters: peak RSS 1.2 GiB = 0.5 baseline + 0.66 model.)
"""

import collections
import inspect
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import paddle
from paddlenlp.transformers import GLMChineseTokenizer
from paddlenlp.transformers.model_utils import no_init_weights

from .cli.arguments import ArgumentParser
from .cli.console import LOG_LEVELS, configure_logging
from .cli.process import command
from .configuration import GLMConfig
from .errors import ConversionError
from .files import staged_directory
from .modeling import GLMForConditionalGeneration

__all__ = ["convert_checkpoint", "read_safetensors", "read_torch_bin", "main"]


# Torch Linear weights are [out, in], Paddle's [in, out]: exactly these are transposed.
TRANSPOSED = (
    "attention.query_key_value.weight",
    "attention.dense.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)

# THUDM's `architectures` for checkpoints whose weights are exactly GLM's LM (GLMForMultipleChoice adds no
# weights; THUDM's released configs say "GLMModel" even for the LM).
GLM_ARCHITECTURES = {"GLMModel", "GLMForConditionalGeneration", "GLMForMultipleChoice"}
REQUIRED_CONFIG_KEYS = ("num_layers", "vocab_size", "hidden_size", "num_attention_heads", "max_sequence_length")
TOKEN_ID_KEYS = ("pad_token_id", "eos_token_id", "bos_token_id")

# glm-10b-chinese was pretrained with <|endofpiece|> and [gMASK] sharing id 50007 (THUDM/GLM#55). THUDM's HF
# release gives [gMASK] its own id 50009 (as PaddleNLP's tokenizer does), copies row 50007 of the word
# embeddings into row 50009 (scripts/convert_glm_checkpoint_to_transformers.py), and bans 50009 in decoding
# (`bad_words_id` in its config, as in PaddleNLP's): with the LM head tied to the embeddings, [gMASK]'s logit
# equals eop's, so sampling would emit [gMASK] where eop was meant.
EOP_ID, GMASK_ID = 50007, 50009

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference; each may be sharded
EMBEDDINGS = "glm.word_embeddings.weight"


# ---------------------------------------------------------------------------------------------- readers


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    # bfloat16 is the upper half of a float32: shifting its 16 bits up is the exact widening.
    return (bits.astype(np.uint32) << 16).view(np.float32)


_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}  # fmt: skip


def read_safetensors(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """(name, array) for each tensor of a safetensors file, memory-mapped and copied one at a time.

    Read from the documented layout (u64 header length, JSON header, data) rather than with the
    `safetensors` package, whose numpy API cannot return bfloat16.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        if 8 + header_length > size:
            raise ConversionError(f"{path}: truncated or not a safetensors file (a {header_length}-byte header in {size} bytes)")
        try:
            header = json.loads(file.read(header_length))
        except ValueError:
            raise ConversionError(f"{path}: not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"{path}: tensor {name} has dtype {entry['dtype']}, which GLM weights never use")
        start, end = entry["data_offsets"]
        if 8 + header_length + end > size:
            raise ConversionError(
                f"{path}: truncated: tensor {name} ends at byte {8 + header_length + end}, the file has {size} "
                "(an interrupted download or copy?)"
            )
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_length + start, shape=(end - start,))
        array = np.array(data.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"]))
        yield name, _bfloat16_to_float32(array) if entry["dtype"] == "BF16" else array


_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}  # fmt: skip


class _TorchStorage:
    def __init__(self, storage_class: str, key: str):
        self.storage_class, self.key = storage_class, key


class _TorchTensor:
    """A tensor of a torch zip checkpoint, read from its storage entry when `load` is called."""

    def __init__(self, storage: _TorchStorage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def load(self, archive: zipfile.ZipFile, prefix: str) -> np.ndarray:
        dtype = np.dtype(_TORCH_STORAGE_DTYPES[self.storage.storage_class])
        flat = np.frombuffer(archive.read(f"{prefix}data/{self.storage.key}"), dtype=dtype)
        last = self.offset + sum((n - 1) * step for n, step in zip(self.size, self.stride))
        if all(self.size) and not 0 <= last < len(flat):  # as_strided would read outside the storage
            raise ConversionError(
                f"{archive.filename}: a tensor reaches past its storage {self.storage.key} (corrupt file)"
            )
        strides = [step * dtype.itemsize for step in self.stride]
        array = np.array(np.lib.stride_tricks.as_strided(flat[self.offset :], self.size, strides))
        return _bfloat16_to_float32(array) if self.storage.storage_class == "BFloat16Storage" else array


class _TorchUnpickler(pickle.Unpickler):
    """Rebuilds the pickle of `torch.save(state_dict)` from an allow-list: nothing else is ever called."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict  # a module's state_dict() also pickles its `_metadata` attribute
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *unused: _TorchTensor(storage, offset, size, stride)
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *unused: data
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return name
        raise ConversionError(
            f"{self.path}: pickles {module}.{name}, which the torch-free reader does not rebuild; "
            "save the state dict as safetensors instead"
        )

    def persistent_load(self, pid):
        # ('storage', storage class (as find_class returned it), key of its zip entry, location, numel)
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and pid[1] in _TORCH_STORAGE_DTYPES):
            raise ConversionError(f"{self.path}: unknown torch storage record {str(pid)[:80]}")
        return _TorchStorage(pid[1], pid[2])


def read_torch_bin(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """(name, array) for each tensor of a `torch.save`d state dict (zip format, torch >= 1.6), one at a time."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as file:
            magic = file.read(4)
        if magic == b"PK\x03\x04":  # a zip whose end (the central directory) is missing
            raise ConversionError(f"{path}: truncated (a torch zip checkpoint without its end; an interrupted download or copy?)")
        if not magic.startswith(b"\x80"):  # every torch pickle starts with the PROTO opcode
            raise ConversionError(f"{path}: not a torch checkpoint")
        raise ConversionError(
            f"{path}: not a torch zip checkpoint (the legacy format of torch < 1.6 is not read); "
            "re-save it with a recent torch or as safetensors"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")]
        if not pickles:
            raise ConversionError(f"{path}: a zip file without data.pkl, not a torch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"  # older torch writes none: little-endian
        if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
            raise ConversionError(f"{path}: big-endian torch checkpoints are not read")
        with archive.open(pickles[0]) as file:
            state_dict = _TorchUnpickler(file, path).load()
        if not isinstance(state_dict, dict):
            raise ConversionError(f"{path}: holds a {type(state_dict).__name__}, not a state dict")
        for name, tensor in state_dict.items():
            if not isinstance(tensor, _TorchTensor):
                raise ConversionError(f"{path}: entry {name} is a {type(tensor).__name__}, not a tensor")
            yield name, tensor.load(archive, prefix)


def checkpoint_shards(input_dir: str) -> List[str]:
    """The weight files of a HF checkpoint directory, preferring safetensors, following an index if sharded."""
    for weights in WEIGHT_FILES:
        index = os.path.join(input_dir, weights + ".index.json")
        if os.path.exists(index):
            with open(index) as file:
                shards = sorted(set(json.load(file)["weight_map"].values()))
            paths = [os.path.join(input_dir, shard) for shard in shards]
            missing = [path for path in paths if not os.path.exists(path)]
            if missing:
                raise ConversionError(f"{index} names {len(shards)} shards but {missing[0]} is missing")
            return paths
        if os.path.exists(os.path.join(input_dir, weights)):
            return [os.path.join(input_dir, weights)]
    raise ConversionError(f"{input_dir}: no weights (looked for {', '.join(WEIGHT_FILES)} and their .index.json)")


def read_tensors(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    return read_safetensors(path) if path.endswith(".safetensors") else read_torch_bin(path)


# ---------------------------------------------------------------------------------------------- config


def read_hf_config(input_dir: str) -> dict:
    path = os.path.join(input_dir, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{input_dir}: no config.json (expected a THUDM HuggingFace GLM checkpoint directory)")
    try:
        with open(path) as file:
            hf_config = json.load(file)
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None
    architectures = hf_config.get("architectures") or []
    unknown = [name for name in architectures if name not in GLM_ARCHITECTURES]
    if unknown or (not architectures and hf_config.get("model_type") != "glm"):
        found = unknown[0] if unknown else f"model_type {hf_config.get('model_type')!r}"
        raise ConversionError(
            f"{path}: unknown architecture {found}; this converter reads THUDM's GLM "
            f"({', '.join(sorted(GLM_ARCHITECTURES))}), not ChatGLM or other models"
        )
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in hf_config]
    if missing:
        raise ConversionError(f"{path}: lacks {', '.join(missing)}, so it is not a THUDM GLM config")
    return hf_config


def glm_config_kwargs(hf_config: dict) -> Tuple[dict, List[str]]:
    """Our GLMConfig fields from THUDM's config, and the keys dropped (HF-only: auto_map,
    checkpoint_activations, torch_dtype, ...; `architectures` is rewritten)."""
    fields = set(inspect.signature(GLMConfig.__init__).parameters) - {"self", "kwargs"}
    kwargs = {key: value for key, value in hf_config.items() if key in fields or key in TOKEN_ID_KEYS}
    dropped = sorted(set(hf_config) - set(kwargs) - {"architectures", "model_type", "bad_words_id", "bad_words_ids"})
    return kwargs, dropped


def expected_shapes(config: GLMConfig) -> Dict[str, Tuple[int, ...]]:
    # LazyGuard + no_init_weights: parameter shapes of a 10B model without allocating it.
    with no_init_weights(_enable=True), paddle.LazyGuard():
        model = GLMForConditionalGeneration(config)
    return {name: tuple(param.shape) for name, param in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- weights


def convert_weights(shards: List[str], config: GLMConfig, dtype: Optional[str], report) -> Dict[str, np.ndarray]:
    """Every tensor renamed to PaddleNLP's name, transposed if a Linear weight, checked against our model."""
    expected = expected_shapes(config)
    sizes = f"num_layers={config.num_layers}, hidden_size={config.hidden_size}, vocab_size={config.vocab_size}"
    converted = {}
    for shard in shards:
        report(f"reading {shard}")
        for name, array in read_tensors(shard):
            # THUDM's released files hold GLMModel's names (word_embeddings..., transformer...); a state dict
            # saved from HF's GLMForConditionalGeneration has them under `glm.`.
            target = name if name.startswith("glm.") else "glm." + name
            if target not in expected:
                raise ConversionError(
                    f"{shard}: tensor {name} has no place in GLM's LM (another model or a task head?)"
                )
            if target in converted:
                raise ConversionError(f"{shard}: tensor {name} appears twice in the checkpoint")
            if not np.issubdtype(array.dtype, np.floating):
                raise ConversionError(f"{shard}: tensor {name} is {array.dtype}, GLM weights are floating point")
            torch_shape = array.shape
            if target.endswith(TRANSPOSED):
                array = np.ascontiguousarray(array.T)
            if array.shape != expected[target]:
                torch_expected = expected[target][::-1] if target.endswith(TRANSPOSED) else expected[target]
                raise ConversionError(
                    f"{shard}: tensor {name} has shape {list(torch_shape)} but config.json ({sizes}) "
                    f"needs {list(torch_expected)}"
                )
            keep = dtype or ("float16" if array.dtype == np.float16 else "float32")
            converted[target] = array.astype(keep, copy=False)
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} GLM weights, e.g. {missing[0]}")
    return {name: converted[name] for name in expected}  # the model's order, whatever the shards' order


def resolve_eop_gmask_overlap(embeddings: np.ndarray, hf_config: dict, mode: str) -> Tuple[bool, str]:
    """Apply --eop_gmask_overlap to the word embeddings (in place); returns (ban [gMASK]?, message)."""
    # THUDM's config (and PaddleNLP's for glm-10b-chinese) says `bad_words_id: [50009]`; HF's field would
    # be `bad_words_ids: [[50009]]`.
    bans = hf_config.get("bad_words_id") or hf_config.get("bad_words_ids") or []
    banned = GMASK_ID in bans or [GMASK_ID] in bans
    if embeddings.shape[0] <= GMASK_ID:
        if mode == "share":
            raise ConversionError(
                f"--eop_gmask_overlap share needs [gMASK] id {GMASK_ID}, but vocab_size is {embeddings.shape[0]}"
            )
        return False, f"eop/[gMASK]: the vocabulary has no id {GMASK_ID}, not glm-10b-chinese's; embeddings unchanged"
    identical = np.array_equal(embeddings[EOP_ID], embeddings[GMASK_ID])
    if mode == "share":
        embeddings[GMASK_ID] = embeddings[EOP_ID]
        return True, (
            f"eop/[gMASK]: [gMASK] {GMASK_ID} shares <|endofpiece|> {EOP_ID}'s embedding row, as glm-10b-chinese was "
            f"pretrained (THUDM/GLM#55; {'rows already identical' if identical else 'row copied'}); config bans "
            f"{GMASK_ID} (bad_words_id) because its tied logit equals eop's"
        )
    if not banned and not identical:
        return False, "eop/[gMASK]: separate embedding rows and no ban (not glm-10b-chinese's shared id); unchanged"
    if banned and identical:
        return True, (
            f"eop/[gMASK]: kept THUDM's handling of glm-10b-chinese's shared id (THUDM/GLM#55): row {GMASK_ID} "
            f"already equals row {EOP_ID}, and config still bans {GMASK_ID} (bad_words_id)"
        )
    return banned, (
        f"eop/[gMASK]: warning: rows {EOP_ID}/{GMASK_ID} {'are identical' if identical else 'differ'} but config "
        f"{'bans' if banned else 'does not ban'} {GMASK_ID}; kept as found. If this is glm-10b-chinese, "
        "rerun with --eop_gmask_overlap share"
    )


# ---------------------------------------------------------------------------------------------- output


def write_state_dict(state_dict: Dict[str, np.ndarray], path: str):
    # paddle.load and PaddleNLP's from_pretrained read a plain pickled dict of numpy arrays (what paddle.save
    # writes); protocol 5 writes each array's buffer directly where protocol 4 would copy it first.
    with open(path, "wb") as file:
        pickle.dump(state_dict, file, protocol=5)


def write_chinese_tokenizer(input_dir: str, output_dir: str) -> bool:
    """PaddleNLP's GLMChineseTokenizer files from `input_dir`'s cog-pretrain.model; False when it has none."""
    model_file = os.path.join(input_dir, "cog-pretrain.model")
    if not os.path.exists(model_file):
        return False
    # Only the sentencepiece model is taken: THUDM's tokenizer_config.json lists GLM's special tokens in
    # another order, and PaddleNLP's GLMChineseTokenizer assigns their ids (50000-50009) itself.
    with tempfile.TemporaryDirectory() as staging:
        shutil.copy(model_file, staging)
        with open(os.path.join(staging, "tokenizer_config.json"), "w") as file:
            json.dump({"tokenizer_class": "GLMChineseTokenizer"}, file)
        GLMChineseTokenizer.from_pretrained(staging).save_pretrained(output_dir)
    return True


def convert_checkpoint(
    input_dir: str,
    output_dir: str,
    eop_gmask_overlap: str = "keep",
    dtype: Optional[str] = None,
    report: Callable[[str], None] = print,
):
    """Convert THUDM's HF GLM checkpoint in `input_dir` to `output_dir` (which must be new or empty). It is
    written beside it and renamed onto it once complete (glm.files.staged_directory): a kill never leaves
    a torn model_state.pdparams, and a rerun removes what the killed run left."""
    if not os.path.isdir(input_dir):
        raise ConversionError(f"{input_dir}: no such directory")
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"{output_dir} exists and is not empty; choose a new --output_dir")
    hf_config = read_hf_config(input_dir)
    kwargs, dropped = glm_config_kwargs(hf_config)
    try:
        config = GLMConfig(**kwargs)
    except ValueError as error:
        raise ConversionError(f"{input_dir}/config.json: {error}") from None
    state_dict = convert_weights(checkpoint_shards(input_dir), config, dtype, report)
    ban_gmask, message = resolve_eop_gmask_overlap(state_dict[EMBEDDINGS], hf_config, eop_gmask_overlap)
    report(message)
    if ban_gmask:
        config.bad_words_id = [GMASK_ID]  # read by glm.generation (default_banned_ids)
    config.architectures = ["GLMForConditionalGeneration"]

    with staged_directory(output_dir, report) as staged:
        write_state_dict(state_dict, os.path.join(staged, "model_state.pdparams"))
        config.save_pretrained(staged)
        tokenizer_written = write_chinese_tokenizer(input_dir, staged)
    dtypes = sorted({str(array.dtype) for array in state_dict.values()})
    report(f"weights: {len(state_dict)} tensors ({', '.join(dtypes)}) written to {output_dir}/model_state.pdparams")
    if dropped:
        report(f"config: dropped HF-only keys {', '.join(dropped)}")
    if tokenizer_written:
        report(f"tokenizer: GLMChineseTokenizer from cog-pretrain.model written to {output_dir}")
    else:
        report(f"tokenizer: no cog-pretrain.model in {input_dir}, none written (only GLM-chinese's is converted)")


def main(argv=None):
    parser = ArgumentParser(
        prog="python -m glm.convert",
        description="Convert a THUDM HuggingFace GLM checkpoint (config.json, model.safetensors or pytorch_model.bin, "
        "sharded or not, cog-pretrain.model) into config.json + model_state.pdparams + PaddleNLP tokenizer files.",
    )
    parser.add_argument("--input_dir", required=True, help="THUDM HF checkpoint directory, e.g. glm-large-chinese")
    parser.add_argument("--output_dir", required=True, help="new (or empty) directory to write")
    parser.add_argument(
        "--eop_gmask_overlap",
        choices=["keep", "share"],
        default="keep",
        help="glm-10b-chinese was pretrained with <|endofpiece|> and [gMASK] sharing id 50007 (THUDM/GLM#55); its "
        "HF release gives [gMASK] id 50009 with a copy of row 50007 and bans 50009 in decoding. "
        "keep (default): write the embeddings exactly as stored and carry over the checkpoint's own [gMASK] ban "
        "(right for THUDM's releases, and for every model without the overlap). "
        "share: copy row 50007 over row 50009 and ban 50009 in decoding (config bad_words_id), for a "
        "glm-10b-chinese checkpoint that lost THUDM's copy or ban; never use it for other models, whose [gMASK] "
        "row was trained on its own.",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        help="store every weight in this dtype (default: float32/float16 as stored, bfloat16 widened to float32). "
        "float16 keeps a float32 10B checkpoint's conversion under 24 GiB of memory.",
    )
    parser.add_argument("--log_level", default="warning", choices=LOG_LEVELS, help="PaddleNLP's log lines (info: loading)")
    with command(also=(OSError,)):  # an OSError: e.g. a full disk while writing
        args = parser.parse_args(argv)
        configure_logging(["--log_level", args.log_level])
        convert_checkpoint(args.input_dir, args.output_dir, args.eop_gmask_overlap, args.dtype)


if __name__ == "__main__":
    main()

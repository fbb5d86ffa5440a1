"""The embedded offline default: demo_data/ and configs/glm-tiny-chinese/ are exactly what
tools/build_tiny_default.py builds, and they have the properties the offline training relies on."""

import importlib.util
import json
import os
import unicodedata

import pytest
import sentencepiece as spm
from conftest import ROOT
from paddlenlp.transformers import AutoTokenizer, GLMChineseTokenizer

from glm import GLMConfig

BUILT_DIRS = ["demo_data", os.path.join("configs", "glm-tiny-chinese")]
MODEL_DIR = os.path.join(ROOT, "configs", "glm-tiny-chinese")
SPECIAL_TOKEN_OFFSETS = {  # above the sentencepiece vocabulary, in PaddleNLP's GLMChineseTokenizer order
    "<|endoftext|>": 0, "[SEP]": 1, "[CLS]": 2, "[MASK]": 3, "[UNUSED1]": 4, "[UNUSED2]": 5,
    "<|startofpiece|>": 6, "<|endofpiece|>": 7, "[sMASK]": 8, "[gMASK]": 9,
}


def read_rows(name):
    with open(os.path.join(ROOT, "demo_data", name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def attribute_values(content):
    return [pair.split("#", 1)[1] for pair in content.split("*")]


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    script = os.path.join(ROOT, "tools", "build_tiny_default.py")
    spec = importlib.util.spec_from_file_location("build_tiny_default", script)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    output_root = tmp_path_factory.mktemp("tiny_default")
    builder.main(["--output_root", str(output_root)])
    return output_root


@pytest.mark.parametrize("directory", BUILT_DIRS)
def test_build_reproduces_the_committed_files(rebuilt, directory):
    committed, built = os.path.join(ROOT, directory), os.path.join(rebuilt, directory)
    # Files only: demo_data/cloze/ is built from these by tools/build_cloze_demo.py (tests/test_finetune_cloze.py).
    committed_files = sorted(n for n in os.listdir(committed) if os.path.isfile(os.path.join(committed, n)))
    assert sorted(os.listdir(built)) == committed_files
    for name in os.listdir(built):
        with open(os.path.join(built, name), "rb") as b, open(os.path.join(committed, name), "rb") as c:
            assert b.read() == c.read(), f"{directory}/{name} differs from what tools/build_tiny_default.py builds"


def test_sentencepiece_is_laid_out_like_glm_chinese():
    # Through the processor, not sentencepiece_model_pb2: that module breaks on a protobuf runtime older
    # than the one it was generated with. (BPE and nmt_nfkc are set by the build, checked byte for byte above.)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(MODEL_DIR, "cog-pretrain.model"))
    assert [sp.IdToPiece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<n>"]
    assert sp.IsUnknown(0) and sp.IsControl(1) and sp.IsControl(2) and not sp.IsControl(3)
    assert not any(sp.IsByte(i) for i in range(len(sp))), "byte_fallback is off in GLM's tokenizer"


@pytest.mark.parametrize("loader", [GLMChineseTokenizer, AutoTokenizer])
def test_tokenizer_loads_with_glm_special_ids(loader):
    tokenizer = loader.from_pretrained(MODEL_DIR)
    assert isinstance(tokenizer, GLMChineseTokenizer)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKEN_OFFSETS}
    assert ids == {token: tokenizer.vocab_size + offset for token, offset in SPECIAL_TOKEN_OFFSETS.items()}
    assert len(set(ids.values())) == len(ids) and len(tokenizer) == tokenizer.vocab_size + len(ids)


def test_tokenizer_round_trips_demo_texts():
    tokenizer = GLMChineseTokenizer.from_pretrained(MODEL_DIR)
    for row in read_rows("dev.json")[:20]:
        for text in row.values():
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            # nmt_nfkc, like GLM's own tokenizer, turns the full-width comma into ','.
            assert tokenizer.decode(ids) == unicodedata.normalize("NFKC", text)


def test_config_covers_the_tokenizer_and_the_demo_examples():
    config = GLMConfig.from_pretrained(MODEL_DIR)
    tokenizer = GLMChineseTokenizer.from_pretrained(MODEL_DIR)
    assert config.architectures == ["GLMForConditionalGeneration"]
    assert config.vocab_size >= len(tokenizer) and config.vocab_size % 64 == 0
    rows = read_rows("train.json") + read_rows("dev.json")
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for row in rows for text in row.values()]
    # [CLS] content [gMASK] <|endoftext|> <|startofpiece|> summary
    assert max(map(sum, zip(lengths[::2], lengths[1::2]))) + 4 <= config.max_sequence_length


@pytest.mark.parametrize("name", ["train.json", "dev.json"])
def test_every_summary_holds_each_attribute_value(name):
    for row in read_rows(name):
        missing = [value for value in attribute_values(row["content"]) if value not in row["summary"]]
        assert not missing, f"{row} lacks {missing}"


def test_train_and_dev_share_no_content():
    train, dev = read_rows("train.json"), read_rows("dev.json")
    assert len(train) >= 2000 and len(dev) >= 100
    assert not {row["content"] for row in train} & {row["content"] for row in dev}

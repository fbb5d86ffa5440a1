"""Loading a GLM tokenizer and naming its special ids.

PaddleNLP's `GLMChineseTokenizer` adds GLM's special tokens above the sentencepiece vocabulary when it
is loaded with `from_pretrained(dir)`. Built directly (`GLMChineseTokenizer(model_file=...)`) it maps
every special token to sentencepiece's unknown id 0, and training would then silently learn nonsense:
`special_token_ids` refuses such a tokenizer.

`encode_text` tokenizes text the way pretraining saw it. Pretraining encodes each document whole, so the
text after a blank continues without the "▁" sentencepiece puts before every text it encodes (its dummy
prefix); the tokenizer encodes each piece between special tokens as a text of its own and gives the word
after a [MASK], and a choice or answer tokenized alone, that "▁": `总的来说，这是一条[MASK]评价。` ended in
`[MASK] ▁评价 。` and the choice 正面 became `▁正 面`, where pretraining has `[MASK] 评价 。` and `正面`.
"""

import json
import os
import re
import weakref
from dataclasses import dataclass
from typing import List

import paddlenlp.transformers
from paddlenlp.transformers import AutoTokenizer

from .errors import TokenizerError

__all__ = ["GLMSpecialIds", "TOKENIZER_FILES", "load_tokenizer", "special_token_ids", "encode_text"]

# The files of PaddleNLP's GLM tokenizers: GLMChineseTokenizer (cog-pretrain.model), GLMGPT2Tokenizer,
# GLMBertTokenizer.
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "cog-pretrain.model", "vocab.json", "merges.txt", "vocab.txt",
)  # fmt: skip


@dataclass(frozen=True)
class GLMSpecialIds:
    cls: int
    eos: int  # <|endoftext|>, also the padding id
    sop: int  # <|startofpiece|>: starts every generated span
    eop: int  # <|endofpiece|>: ends it
    mask: int  # [MASK]: a short blank
    smask: int  # [sMASK]: a sentence blank
    gmask: int  # [gMASK]: long generation at the end

    @property
    def pad(self) -> int:
        return self.eos

    @property
    def mask_ids(self):
        return (self.mask, self.smask, self.gmask)


_SPECIAL_TOKENS = {
    "cls": "[CLS]",
    "eos": "<|endoftext|>",
    "sop": "<|startofpiece|>",
    "eop": "<|endofpiece|>",
    "mask": "[MASK]",
    "smask": "[sMASK]",
    "gmask": "[gMASK]",
}


def special_token_ids(tokenizer) -> GLMSpecialIds:
    """The GLM special ids of `tokenizer`; a TokenizerError if any two coincide or one is unknown."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in _SPECIAL_TOKENS.items()}
    by_id = {}
    for name, token_id in ids.items():
        by_id.setdefault(token_id, []).append(_SPECIAL_TOKENS[name])
    for token_id, tokens in by_id.items():
        if len(tokens) > 1:
            raise TokenizerError(
                f"the tokenizer maps GLM special tokens {', '.join(tokens)} to the same id {token_id} "
                "(GLMChineseTokenizer(model_file=...) does this): load it with from_pretrained(DIR) instead"
            )
    unknown = getattr(tokenizer, "unk_token_id", None)
    for name, token_id in ids.items():
        if token_id is None or token_id == unknown:
            raise TokenizerError(
                f"the tokenizer does not know GLM's {_SPECIAL_TOKENS[name]} (it maps to the unknown id {token_id}); "
                "load it with from_pretrained(DIR) from a directory holding tokenizer_config.json"
            )
    return GLMSpecialIds(**ids)


def load_tokenizer(path: str):
    """The tokenizer saved in directory `path` (a GLM checkpoint or our tiny default), checked for GLM."""
    if not os.path.isdir(path):
        raise TokenizerError(f"{path}: not a directory (expected a GLM checkpoint or tokenizer directory)")
    config_file = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(config_file):
        raise TokenizerError(f"{path}: no tokenizer_config.json, so no tokenizer can be loaded from it")
    try:
        with open(config_file, encoding="utf-8") as f:
            class_name = json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError) as error:
        raise TokenizerError(f"{config_file}: not a JSON object ({error})") from None
    # PaddleNLP builds a tokenizer without its vocabulary file and fails with a TypeError deep inside.
    needed = getattr(getattr(paddlenlp.transformers, str(class_name), None), "resource_files_names", {})
    missing = [name for name in needed.values() if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise TokenizerError(f"{path}: no {missing[0]}, the vocabulary file its {class_name} needs")
    tokenizer = AutoTokenizer.from_pretrained(path)
    special_token_ids(tokenizer)
    return tokenizer


# -- text as pretraining tokenizes it ---------------------------------------------------------------------


def _varint(data: bytes, at: int):
    value, shift = 0, 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def without_dummy_prefix(model_proto: bytes) -> bytes:
    """A serialized sentencepiece ModelProto with NormalizerSpec.add_dummy_prefix false (field 3 of field 3;
    the last value of a field wins) and without its self-test samples (field 4, checked on load, which
    assume the prefix). Raw wire format: sentencepiece's generated protobuf module needs another protobuf
    runtime than PaddlePaddle's."""
    out, at = bytearray(), 0
    while at < len(model_proto):
        key, start = _varint(model_proto, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            end = _varint(model_proto, start)[1]
        elif wire in (1, 5):
            end = start + (8 if wire == 1 else 4)
        elif wire == 2:
            length, payload = _varint(model_proto, start)
            end = payload + length
            if field == 3:  # normalizer_spec
                spec = model_proto[payload:end] + b"\x18\x00"  # add_dummy_prefix = false
                out += _varint_bytes(key) + _varint_bytes(len(spec)) + spec
                at = end
                continue
            if field == 4:  # self_test_data
                at = end
                continue
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in a sentencepiece model")
        out += model_proto[at:end]
        at = end
    return bytes(out)


_PLAIN_ENCODERS = weakref.WeakKeyDictionary()  # tokenizer -> (its sentencepiece model without the prefix, splitter)


def _plain_encoder(tokenizer):
    found = _PLAIN_ENCODERS.get(tokenizer)
    if found is None:
        import sentencepiece

        proto = without_dummy_prefix(tokenizer.sp_model.serialized_model_proto())
        plain = sentencepiece.SentencePieceProcessor(model_proto=proto)
        specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
        found = plain, re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        _PLAIN_ENCODERS[tokenizer] = found
    return found


def encode_text(tokenizer, text: str, continuation: bool = False) -> List[int]:
    """`tokenizer(text, add_special_tokens=False)` as pretraining tokenizes the same text inside a document
    (glm.pretraining.corpus encodes documents whole): text after a special token (a blank), and all of it
    with `continuation` (a choice or answer that fills a blank), gets no sentencepiece dummy prefix, unless
    it starts with whitespace (then its "▁" is that whitespace, as in the whole text). Tokenizers without a
    sentencepiece model are called as they are."""
    if getattr(tokenizer, "sp_model", None) is None:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    plain, splitter = _plain_encoder(tokenizer)
    ids = []
    for number, segment in enumerate(splitter.split(text)):
        if number % 2:  # a special token
            ids.append(tokenizer.convert_tokens_to_ids(segment))
        elif segment and (continuation or number > 0) and not segment[0].isspace():
            if getattr(tokenizer, "do_lower_case", False):
                segment = segment.lower()
            ids += plain.encode(segment)
        elif segment:
            ids += tokenizer(segment, add_special_tokens=False)["input_ids"]
    return ids

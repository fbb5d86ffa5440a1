"""Loading a GLM tokenizer and naming its special ids.

PaddleNLP's `GLMChineseTokenizer` adds GLM's special tokens above the sentencepiece vocabulary when it
is loaded with `from_pretrained(dir)`. Built directly (`GLMChineseTokenizer(model_file=...)`) it maps
every special token to sentencepiece's unknown id 0, and training would then silently learn nonsense:
`special_token_ids` refuses such a tokenizer.
"""

import json
import os
from dataclasses import dataclass

import paddlenlp.transformers
from paddlenlp.transformers import AutoTokenizer

from .errors import TokenizerError

__all__ = ["GLMSpecialIds", "TOKENIZER_FILES", "load_tokenizer", "special_token_ids"]

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

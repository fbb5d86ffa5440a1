"""The GLM input builder: a hand-worked example, truncation, blanks, padding, and the real tokenizer."""

import json
import shutil
import unicodedata

import numpy as np
import paddle
import pytest
from conftest import shared_path
from paddlenlp.transformers import GLMChineseTokenizer

from glm.inputs import IGNORE_INDEX, GLMInputBuilder, collate_examples
from glm.errors import TokenizerError
from glm.tokenization import load_tokenizer, special_token_ids

SPECIALS = {
    "[CLS]": 10, "<|endoftext|>": 11, "[MASK]": 12, "[sMASK]": 13, "[gMASK]": 14,
    "<|startofpiece|>": 15, "<|endofpiece|>": 16,
}  # fmt: skip


class CharTokenizer:
    """One id per character, GLM's special tokens recognised whole: ids a reader can check by hand."""

    vocab = {"a": 1, "b": 2, "c": 3, "x": 4, "y": 5}
    unk_token_id = 0

    def convert_tokens_to_ids(self, token):
        return SPECIALS.get(token, self.vocab.get(token, 0))

    def __call__(self, text, add_special_tokens=False):
        ids = []
        while text:
            special = next((s for s in SPECIALS if text.startswith(s)), None)
            piece = special or text[0]
            ids.append(self.convert_tokens_to_ids(piece))
            text = text[len(piece) :]
        return {"input_ids": ids}


def test_hand_worked_training_example():
    builder = GLMInputBuilder(CharTokenizer(), src_length=8, tgt_length=4)
    example = builder.build("abc", "xy")
    #                        [CLS] a  b  c [gMASK] eot sop x  y
    assert example.input_ids == [10, 1, 2, 3, 14, 11, 15, 4, 5]
    assert example.sep == 6
    assert example.position_ids == [[0, 1, 2, 3, 4, 5, 4, 4, 4], [0, 0, 0, 0, 0, 0, 1, 2, 3]]
    assert example.labels == [IGNORE_INDEX] * 6 + [4, 5, 16]  # x y eop, one to the right of sop x y
    assert example.loss_mask == [0] * 6 + [1, 1, 1]
    assert not example.source_truncated and not example.target_truncated


def test_prediction_source_side_equals_training_source_side():
    builder = GLMInputBuilder(CharTokenizer(), src_length=8, tgt_length=4)
    train = builder.build("abcab", "xyx")
    predict = builder.build("abcab")
    assert predict.input_ids == train.input_ids[: train.sep]
    assert predict.position_ids == [channel[: train.sep] for channel in train.position_ids]
    assert predict.sep == train.sep and predict.labels is None


def test_source_is_cut_on_the_right_keeping_special_tokens():
    builder = GLMInputBuilder(CharTokenizer(), src_length=6, tgt_length=3)
    example = builder.build("abcabc", "xyxy")
    assert example.input_ids[:6] == [10, 1, 2, 3, 14, 11]  # a b c kept: the right is cut
    assert example.input_ids[6:] == [15, 4, 5]  # sop + the first tgt_length - 1 target tokens
    assert example.labels[6:] == [4, 5, 4]  # THUDM's (target + [eop])[:tgt_length]: a cut target has no eop
    assert example.source_truncated and example.target_truncated


def test_target_cut_follows_thudm_and_a_fitting_target_keeps_its_eop():
    builder = GLMInputBuilder(CharTokenizer(), src_length=6, tgt_length=3)
    fits = builder.build("ab", "xy")  # x y eop is exactly tgt_length
    assert fits.labels[-3:] == [4, 5, 16] and not fits.target_truncated
    cut = builder.build("ab", "xyx")  # x y x eop: one too many, the eop goes
    assert cut.labels[-3:] == [4, 5, 4] and cut.input_ids[-3:] == [15, 4, 5] and cut.target_truncated
    assert len(cut.labels) == len(cut.input_ids) == len(cut.loss_mask)


@pytest.mark.parametrize("mask_token, mask_id", [("[MASK]", 12), ("[sMASK]", 13), ("[gMASK]", 14)])
def test_mask_mode_is_selectable(mask_token, mask_id):
    example = GLMInputBuilder(CharTokenizer(), 8, 4, mask_token=mask_token).build("ab", "x")
    assert example.input_ids[:5] == [10, 1, 2, mask_id, 11]
    assert example.position_ids[0][5:] == [3, 3]


def test_source_with_its_own_blank_gets_no_extra_mask():
    example = GLMInputBuilder(CharTokenizer(), 8, 4).build("a[MASK]bc", "x")
    assert example.input_ids[:6] == [10, 1, 12, 2, 3, 11]
    assert example.position_ids[0][6:] == [2, 2]  # the target sits at the blank's position


def test_unknown_mask_token_is_refused():
    with pytest.raises(ValueError, match="mask_token must be one of"):
        GLMInputBuilder(CharTokenizer(), 8, 4, mask_token="[XMASK]")


def test_collator_pads_to_the_longest_row_only():
    builder = GLMInputBuilder(CharTokenizer(), src_length=32, tgt_length=32)
    batch = collate_examples([builder.build("ab", "x").features(), builder.build("abc", "xyx").features()], pad_id=11)
    assert batch["input_ids"].shape == (2, 10)  # 6 + 4, not 32 + 32
    assert batch["input_ids"][0].tolist() == [10, 1, 2, 14, 11, 15, 4, 11, 11, 11]
    assert batch["labels"][0].tolist()[-3:] == [IGNORE_INDEX] * 3
    assert batch["loss_mask"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert batch["attention_mask"].tolist() == [5, 6]
    assert batch["position_ids"].shape == (2, 2, 10)


def test_padding_is_never_attended_by_real_tokens(tiny_model):
    builder = GLMInputBuilder(CharTokenizer(), src_length=32, tgt_length=32)
    short = builder.build("ab", "xy").features()
    long = builder.build("abcabcabc", "xyxyxyxy").features()
    alone = {k: paddle.to_tensor(v) for k, v in collate_examples([short], pad_id=11).items()}
    padded = {k: paddle.to_tensor(v) for k, v in collate_examples([short, long], pad_id=11).items()}
    n = alone["input_ids"].shape[1]
    logits_alone = tiny_model(alone["input_ids"], alone["position_ids"], alone["attention_mask"])[0].numpy()
    logits_padded = tiny_model(padded["input_ids"], padded["position_ids"], padded["attention_mask"])[0].numpy()
    assert padded["input_ids"].shape[1] > n
    np.testing.assert_allclose(logits_padded[0, :n], logits_alone[0], rtol=1e-5, atol=1e-6)
    # the same loss for the short row alone and inside the padded batch
    loss_alone = tiny_model(alone["input_ids"], alone["position_ids"], alone["attention_mask"],
                            labels=alone["labels"], loss_mask=alone["loss_mask"])[0]
    first = {k: v[:1] for k, v in padded.items()}
    loss_padded = tiny_model(first["input_ids"], first["position_ids"], first["attention_mask"],
                             labels=first["labels"], loss_mask=first["loss_mask"])[0]
    assert float(loss_padded) == pytest.approx(float(loss_alone), rel=1e-5)


@pytest.fixture(scope="module")
def real_tokenizer(tmp_path_factory):
    """The GLM Chinese tokenizer from ../shared, saved the PaddleNLP way and loaded like a checkpoint's."""
    model_file = shared_path("tokenizers", "glm-chinese", "cog-pretrain.model")
    source = tmp_path_factory.mktemp("cog")
    shutil.copy(model_file, source / "cog-pretrain.model")
    saved = tmp_path_factory.mktemp("tokenizer")
    GLMChineseTokenizer.from_pretrained(str(source)).save_pretrained(str(saved))
    return load_tokenizer(str(saved))


def test_real_tokenizer_special_ids(real_tokenizer):
    ids = special_token_ids(real_tokenizer)
    assert (ids.eos, ids.cls, ids.mask, ids.sop, ids.eop, ids.smask, ids.gmask) == (
        50000, 50002, 50003, 50006, 50007, 50008, 50009,
    )  # fmt: skip
    assert real_tokenizer.convert_tokens_to_ids("[SEP]") == 50001
    assert real_tokenizer.pad_token_id == 50000


def test_real_tokenizer_round_trips_chinese(real_tokenizer):
    rows = [json.loads(line) for line in open(shared_path("data", "advertisegen", "dev.jsonl"), encoding="utf-8")]
    for row in rows[:20]:
        ids = real_tokenizer(row["summary"], add_special_tokens=False)["input_ids"]
        assert max(ids) < 50000
        # the sentencepiece model normalises with NFKC (full-width ，becomes ,)
        assert real_tokenizer.decode(ids) == unicodedata.normalize("NFKC", row["summary"])


def test_real_advertisegen_row_builds_glm_inputs(real_tokenizer):
    row = json.loads(open(shared_path("data", "advertisegen", "train.jsonl"), encoding="utf-8").readline())
    example = GLMInputBuilder(real_tokenizer, src_length=608, tgt_length=160).build(row["content"], row["summary"])
    sep = example.sep
    assert example.input_ids[0] == 50002 and example.input_ids[sep - 2 : sep + 1] == [50009, 50000, 50006]
    assert real_tokenizer.decode(example.input_ids[1 : sep - 2]).replace(" ", "") == row["content"].replace(" ", "")
    assert example.labels[-1] == 50007 and example.labels[sep:-1] == example.input_ids[sep + 1 :]
    assert example.position_ids[0][sep:] == [sep - 2] * (len(example.input_ids) - sep)
    assert example.position_ids[1][sep:] == list(range(1, len(example.input_ids) - sep + 1))


def test_tokenizer_built_from_model_file_is_refused():
    model_file = shared_path("tokenizers", "glm-chinese", "cog-pretrain.model")
    with pytest.raises(TokenizerError, match="same id 0"):
        special_token_ids(GLMChineseTokenizer(model_file=model_file))


def test_load_tokenizer_bad_path(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(TokenizerError, match="no tokenizer_config.json"):
        load_tokenizer(str(tmp_path))


def pretraining_blank(tokenizer, before: str, answer: str, after: str):
    """The text tokenized whole, as tools/prepare_pretraining_data.py does (sentencepiece, one document),
    and the token span [start, end) of `answer` in it, as the token objective would blank it."""
    tokens = tokenizer.sp_model.encode(before + answer + after)
    ends, length = [], 0
    for piece in tokenizer.sp_model.id_to_piece(tokens):
        length += len(piece.replace("\u2581", ""))
        ends.append(length)
    normalized = [len(unicodedata.normalize("NFKC", text).replace(" ", "")) for text in (before, before + answer)]
    start, end = ends.index(normalized[0]) + 1, ends.index(normalized[1]) + 1
    return tokens, start, end


def test_a_cloze_row_is_the_pretraining_example_of_the_same_blank(real_tokenizer):
    """Issue 29: the sentiment cloze row, packed for finetune_cloze.py, must be the example pretraining builds
    when the token objective blanks the right choice in the same text: the same ids (no sentencepiece "▁"
    after the [MASK], none before the choice), positions and sep. The tokenizer encodes each piece between
    special tokens on its own: `[MASK] ▁评价` and the choices `▁正 面` / `▁ 负面`, never seen in pretraining."""
    from glm.inputs import MultipleChoiceBuilder
    from glm.pretraining.objective import BlankInfillingBuilder, PretrainingArguments, sentence_end_table

    ids = special_token_ids(real_tokenizer)
    before, after = "这个酒店很好 总的来说，这是一条", "评价。"
    tokens, start, end = pretraining_blank(real_tokenizer, before, "正面", after)
    window = np.array([ids.cls] + tokens + [ids.eos])
    objective = BlankInfillingBuilder(PretrainingArguments(seq_length=128), ids, sentence_end_table(real_tokenizer))
    taught = objective.block_example(window, [(start + 1, end + 1)], ids.mask, "token", np.random.default_rng(0))

    row = MultipleChoiceBuilder(real_tokenizer, src_length=128).build(before + "[MASK]" + after, ["正面", "负面"], 0)
    assert row.choice_ids[0] == tokens[start:end] == taught.labels[taught.sep : -1]  # the span, without its eop
    assert row.choice_ids[1] == real_tokenizer.sp_model.encode(before + "负面" + after)[start:end]
    block = slice(row.context_length, row.context_length + len(row.choice_ids[0]))
    assert row.context_length == taught.sep
    assert row.input_ids[: block.stop] == taught.input_ids[: block.stop]
    assert [channel[: block.stop] for channel in row.position_ids] == [channel[: block.stop] for channel in taught.position_ids]
    assert row.choice_indices[0] == list(range(block.start, block.stop))


def test_a_masked_word_source_is_tokenized_as_pretraining_saw_it(real_tokenizer):
    """predict_generation.py's source for the README's held-out line: the text after the [MASK] continues
    as in the whole line (学习和, not ▁学习 和); text without a blank, and text after a blank that starts
    with a space, are tokenized as the tokenizer does."""
    ids = special_token_ids(real_tokenizer)
    before, answer, after = "……我们必须进一步", "深入", "学习和掌握党的十五大精神……"
    tokens, start, end = pretraining_blank(real_tokenizer, before, answer, after)
    source, _ = GLMInputBuilder(real_tokenizer, 200, 12, mask_token="[MASK]").source_ids(before + "[MASK]" + after)
    assert source == [ids.cls] + tokens[:start] + [ids.mask] + tokens[end:] + [ids.eos]
    builder = GLMInputBuilder(real_tokenizer, 200, 12)
    for text in ("没有空白的一句话。", "好 [MASK] 不错", "[MASK]"):
        assert builder.tokenize(text) == real_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert builder.tokenize(answer, continuation=True) == tokens[start:end]

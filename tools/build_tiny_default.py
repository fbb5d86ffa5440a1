"""Build the embedded offline default of glm-paddle: demo data, a tiny Chinese tokenizer and a tiny GLM config.

    python tools/build_tiny_default.py                      # writes demo_data/ and configs/glm-tiny-chinese/
    python tools/build_tiny_default.py --output_root /tmp/x # same files under /tmp/x

`python finetune_generation.py` with no arguments trains on these, offline, from random init. The script
is deterministic (fixed seeds, no clock, single-threaded sentencepiece): every run writes the same bytes,
and tests/test_tiny_default.py rebuilds into a temporary directory to prove the committed files are its
output.

  demo_data/train.json, dev.json   AdvertiseGen-like JSON Lines rows {"content": "类型#上衣*颜色#白色*...",
                                   "summary": ad copy}; the summary is a learnable function of the
                                   content (every attribute value is in it; phrasings vary by a seeded RNG)
  configs/glm-tiny-chinese/        cog-pretrain.model (BPE sentencepiece laid out like GLM's Chinese one),
                                   PaddleNLP GLMChineseTokenizer files and a GLMConfig config.json (no
                                   weights: the trainer initialises from the config)
"""

import argparse
import contextlib
import io
import json
import math
import os
import random
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from glm import GLMConfig  # noqa: E402
from glm.cli.arguments import ArgumentParser  # noqa: E402
from glm.cli.process import command  # noqa: E402
import sentencepiece as spm  # noqa: E402
from paddlenlp.transformers import AutoTokenizer, GLMChineseTokenizer  # noqa: E402
from paddlenlp.utils.log import logger as paddlenlp_logger  # noqa: E402

SEED = 20240601
NUM_TRAIN, NUM_DEV = 3000, 200
SUMMARY_CHARS = (25, 60)  # summaries outside this range are re-drawn
# Word-bounded BPE on this corpus tops out at 575 pieces (293 characters, ~230 words); 566 keeps every
# frequent word whole and makes the tokenizer 566 + 10 special = 576 = 9 x 64 tokens, the model's vocab.
SP_VOCAB_SIZE = 566
MAX_SEQUENCE_LENGTH = 256
MODEL_DIR = os.path.join("configs", "glm-tiny-chinese")
DATA_DIR = "demo_data"

# GLM's special tokens as PaddleNLP's GLMChineseTokenizer adds them above the sentencepiece vocabulary,
# with their offsets from len(sp). ([UNK] is not among them: it maps to sentencepiece's <unk>, id 0.)
SPECIAL_TOKEN_OFFSETS = {
    "<|endoftext|>": 0, "[SEP]": 1, "[CLS]": 2, "[MASK]": 3, "[UNUSED1]": 4, "[UNUSED2]": 5,
    "<|startofpiece|>": 6, "<|endofpiece|>": 7, "[sMASK]": 8, "[gMASK]": 9,
}

# ---------------------------------------------------------------------------------------------------------
# Data tables. A product is 类型 plus a few optional attributes, written in the category's key order (as
# AdvertiseGen does). Values repeat across categories on purpose: the model should learn to copy a value
# into the phrase of its key, whatever the product.
COLORS = ["白色", "黑色", "红色", "粉色", "蓝色", "灰色", "米白色", "卡其色", "藏青色", "墨绿色", "黄色", "紫色"]
STYLES = ["简约", "复古", "休闲", "文艺", "通勤", "甜美", "街头", "优雅", "运动", "清新"]
PATTERNS = ["纯色", "条纹", "格子", "印花", "刺绣", "波点", "碎花", "字母"]
SEASONS = ["春季", "夏季", "秋季", "冬季"]

CATEGORIES = {  # 类型 -> (weight, [(key, values), ...] in content order)
    "上衣": (3, [
        ("版型", ["宽松", "修身", "直筒", "落肩"]),
        ("材质", ["棉", "针织", "雪纺", "牛仔布", "羊毛", "真丝", "棉麻", "灯芯绒"]),
        ("颜色", COLORS), ("风格", STYLES), ("图案", PATTERNS),
        ("领型", ["圆领", "v领", "翻领", "立领", "高领", "娃娃领", "一字领", "连帽"]),
        ("袖长", ["长袖", "短袖", "七分袖", "五分袖", "无袖"]),
        ("适用季节", SEASONS),
    ]),
    "裙": (3, [
        ("版型", ["a字", "收腰", "包臀", "百褶", "鱼尾", "直筒"]),
        ("材质", ["雪纺", "蕾丝", "网纱", "棉", "针织", "真丝", "丝绒", "牛仔布"]),
        ("颜色", COLORS), ("风格", STYLES), ("图案", PATTERNS),
        ("领型", ["圆领", "v领", "方领", "一字领", "娃娃领", "翻领"]),
        ("袖长", ["长袖", "短袖", "七分袖", "无袖"]),
        ("裙长", ["短裙", "及膝裙", "中长裙", "长裙", "迷你裙"]),
        ("适用季节", SEASONS),
    ]),
    "裤": (2, [
        ("版型", ["阔腿", "直筒", "修身", "宽松", "哈伦", "喇叭"]),
        ("材质", ["牛仔布", "棉", "亚麻", "羊毛", "灯芯绒", "针织"]),
        ("颜色", COLORS), ("风格", STYLES),
        ("图案", ["纯色", "条纹", "格子", "迷彩", "字母"]),
        ("裤长", ["长裤", "九分裤", "七分裤", "短裤", "五分裤"]),
        ("适用季节", SEASONS),
    ]),
    "鞋": (1, [
        ("鞋型", ["运动鞋", "帆布鞋", "乐福鞋", "马丁靴", "凉鞋", "高跟鞋", "小白鞋", "单鞋"]),
        ("材质", ["真皮", "帆布", "绒面", "网面", "漆皮", "牛皮"]),
        ("颜色", COLORS), ("风格", STYLES),
        ("鞋跟", ["平底", "粗跟", "细跟", "坡跟", "厚底"]),
        ("适用季节", SEASONS),
    ]),
    "包": (1, [
        ("包型", ["托特包", "斜挎包", "双肩包", "手提包", "腋下包", "水桶包", "链条包", "贝壳包"]),
        ("材质", ["真皮", "帆布", "尼龙", "牛皮", "羊皮", "草编", "漆皮"]),
        ("颜色", COLORS), ("风格", STYLES),
        ("图案", ["纯色", "格子", "印花", "字母"]),
        ("尺寸", ["大号", "中号", "小号", "迷你"]),
    ]),
}

# The opening clause names the product (and its style when given); one clause per further attribute follows,
# in content order, so the summary is predictable from the content up to the choice among a few phrasings.
OPENINGS = {
    "with_style": ["一款 {风格} 风格 的 {类型}", "这款 {风格} 风 的 {类型}", "主打 {风格} 风 的 {类型}"],
    "plain": ["这款 {类型}", "这款 百搭 {类型}"],
}
PHRASES = {
    "版型": ["{v} 版型 不挑 身材", "{v} 剪裁 修饰 身形", "{v} 版型 穿着 利落"],
    "材质": ["选用 优质 {v} 材质", "{v} 材质 质感 细腻", "{v} 材质 舒适 耐用"],
    "颜色": ["{v} 配色 干净 耐看", "{v} 百搭 又 显 气质", "一抹 {v} 格外 亮眼"],
    "图案": ["{v} 图案 时髦 吸睛", "点缀 {v} 图案", "{v} 元素 很 有 看点"],
    "领型": ["{v} 设计 修饰 脸型", "{v} 衬托 颈部 线条", "{v} 显得 精神 利落"],
    "袖长": ["{v} 清爽 利落", "{v} 设计 方便 活动", "搭配 {v} 更 显 随性"],
    "裙长": ["{v} 设计 恰到好处", "{v} 走路 摇曳生姿", "{v} 款式 灵动 飘逸"],
    "裤长": ["{v} 穿着 刚刚好", "{v} 款式 干练 利落", "{v} 轻松 拉长 腿型"],
    "鞋型": ["经典 {v} 款式", "{v} 造型 百搭 好穿", "{v} 轻松 驾驭 各种 场合"],
    "鞋跟": ["{v} 设计 走路 稳当", "{v} 鞋跟 舒适 不 累脚", "{v} 让 步伐 更 轻盈"],
    "包型": ["经典 {v} 造型", "{v} 款式 实用 百搭", "{v} 通勤 出游 都 合适"],
    "尺寸": ["{v} 尺寸 收纳 方便", "{v} 容量 刚刚好", "{v} 尺寸 轻巧 便携"],
    "适用季节": ["{v} 穿搭 正 合适", "非常 适合 {v} 出行", "{v} 必备 的 单品"],
}
# Spaces in the templates mark word boundaries. The summary drops them; the tokenizer is trained on the
# words (sentencepiece's pretokenization_delimiter) so that no piece spans two words: a value keeps the
# same pieces in the content and in the summary, which is what lets a tiny model learn to copy it.
WORD_DELIMITER = "|"


def log(message):
    print(f"[build_tiny_default] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Step 1: the demo rows.
def draw_product(rng):
    """[(key, value), ...] starting with 类型, then 3-6 optional attributes in the category's order."""
    names = list(CATEGORIES)
    category = rng.choices(names, weights=[CATEGORIES[n][0] for n in names])[0]
    slots = CATEGORIES[category][1]
    chosen = sorted(rng.sample(range(len(slots)), rng.randint(3, min(6, len(slots)))))
    return [("类型", category)] + [(slots[i][0], rng.choice(slots[i][1])) for i in chosen]


def content_words(attributes):
    words = []
    for key, value in attributes:
        words += (["*"] if words else []) + [key, "#", value]
    return words


def summary_words(rng, attributes):
    values = dict(attributes)
    words = rng.choice(OPENINGS["with_style" if "风格" in values else "plain"]).format(**values).split(" ")
    for key, value in attributes:
        if key not in ("类型", "风格"):  # both are in the opening
            words += ["，"] + rng.choice(PHRASES[key]).format(v=value).split(" ")
    return words + ["。"]


def make_examples(rng, count):
    """`count` (content words, summary words) pairs with distinct contents, so that a train/dev split by
    position shares no content."""
    examples, seen = [], set()
    while len(examples) < count:
        attributes = draw_product(rng)
        content, summary = content_words(attributes), summary_words(rng, attributes)
        if "".join(content) in seen or not SUMMARY_CHARS[0] <= len("".join(summary)) <= SUMMARY_CHARS[1]:
            continue
        seen.add("".join(content))
        examples.append((content, summary))
    return examples


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Step 2: the sentencepiece model.
def train_sentencepiece(segmented_texts):
    """Serialized BPE model laid out like GLM's cog-pretrain.model: <unk> <s> </s> then user-defined <n>,
    nmt_nfkc normalisation, no byte fallback. Coverage 1.0: every character of the corpus gets a piece.
    The texts carry WORD_DELIMITER between words; pieces never cross it and it is not part of the model."""
    spm.set_random_generator_seed(SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(segmented_texts),
        pretokenization_delimiter=WORD_DELIMITER,
        model_writer=model,
        model_type="bpe",
        vocab_size=SP_VOCAB_SIZE,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        user_defined_symbols=["<n>"],
        byte_fallback=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,  # multi-threaded training may order equal-frequency merges differently
        minloglevel=2,
    )
    return model.getvalue()


def check_sentencepiece(model_bytes, rows):
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    assert [sp.IdToPiece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<n>"], "GLM's first four pieces"
    for row in rows:
        content, summary = sp.Encode([row["content"], row["summary"]], out_type=str)
        assert sp.IdToPiece(sp.unk_id()) not in content + summary, f"<unk> in {row}"
        # '#' and '*' stay pieces of their own, so each value is the run of pieces between '#' and '*' ...
        for separator in "#*":
            assert content.count(separator) == row["content"].count(separator), f"{separator!r} merged in {content}"
        for attribute in "|".join(content).split("|*|"):
            value = attribute.split("|#|")[1]
            # ... and the summary holds that same run: the value is copyable piece by piece. (A template
            # word that merges with the end of a value, e.g. 短裙+长度 -> 短|裙长|度, breaks this.)
            assert f"|{value}|" in "|" + "|".join(summary) + "|", f"{value} is tokenized apart in {row}"
    return sp


# ---------------------------------------------------------------------------------------------------------
# Step 3: the PaddleNLP tokenizer files, made by PaddleNLP itself from the sentencepiece model.
def save_tokenizer(model_bytes, model_dir):
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "cog-pretrain.model"), "wb") as f:
            f.write(model_bytes)
        tokenizer = GLMChineseTokenizer.from_pretrained(tmp)
        tokenizer.save_pretrained(model_dir)
    with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        assert json.load(f)["tokenizer_class"] == "GLMChineseTokenizer"
    sp_size = tokenizer.vocab_size
    expected = {token: sp_size + offset for token, offset in SPECIAL_TOKEN_OFFSETS.items()}
    for loaded in (tokenizer, GLMChineseTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)):
        ids = {token: loaded.convert_tokens_to_ids(token) for token in SPECIAL_TOKEN_OFFSETS}
        assert ids == expected, f"{type(loaded).__name__} special ids {ids} != {expected}"
        assert len(loaded) == sp_size + len(SPECIAL_TOKEN_OFFSETS), len(loaded)
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Step 4: the model config.
def token_lengths(sp, rows):
    """Lengths of the GLM generation example parts: `[CLS] content [gMASK] <|endoftext|>` and summary + eop."""
    sources = [len(ids) + 3 for ids in sp.Encode([row["content"] for row in rows])]
    targets = [len(ids) + 1 for ids in sp.Encode([row["summary"] for row in rows])]
    return sources, targets


def describe(name, lengths):
    ordered = sorted(lengths)
    p95 = ordered[math.ceil(0.95 * len(ordered)) - 1]
    return f"{name}: max {ordered[-1]}, p95 {p95}, mean {sum(ordered) / len(ordered):.1f}"


def save_config(model_dir, tokenizer_length, longest_example):
    # A sequence is source + <|startofpiece|> + target; keep a margin for longer user prompts.
    assert longest_example + 32 <= MAX_SEQUENCE_LENGTH, longest_example
    config = GLMConfig(
        architectures=["GLMForConditionalGeneration"],
        vocab_size=math.ceil(tokenizer_length / 64) * 64,  # padded like GLM's 50048; multiples of 64 run faster
        # 0.54M parameters: on 2 CPU cores ~0.45 s per step of 32 examples, and dev loss reaches the floor
        # set by the random phrasings in about 3 minutes (hidden 192 x 3 layers learns no better in that time).
        hidden_size=128,
        num_layers=2,
        num_attention_heads=4,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        embedding_dropout_prob=0.1,
        attention_dropout_prob=0.1,
        output_dropout_prob=0.1,
        output_predict=True,
    )
    config.save_pretrained(model_dir)
    return config


# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_paddlenlp():
    """PaddleNLP narrates every added special token at INFO; the build's own messages say what matters."""
    level = paddlenlp_logger.logger.level
    paddlenlp_logger.set_level("WARNING")
    try:
        yield
    finally:
        paddlenlp_logger.logger.setLevel(level)


def build(output_root):
    examples = make_examples(random.Random(SEED), NUM_TRAIN + NUM_DEV)
    rows = [{"content": "".join(content), "summary": "".join(summary)} for content, summary in examples]
    train, dev = rows[:NUM_TRAIN], rows[NUM_TRAIN:]
    for name, part in (("train.json", train), ("dev.json", dev)):
        write_jsonl(os.path.join(output_root, DATA_DIR, name), part)
        log(f"wrote {len(part)} rows to {os.path.join(output_root, DATA_DIR, name)}")

    segmented = [WORD_DELIMITER.join(words) for example in examples for words in example]
    model_bytes = train_sentencepiece(segmented)
    if train_sentencepiece(segmented) != model_bytes:
        raise RuntimeError("sentencepiece training is not deterministic here; the committed model cannot be rebuilt")
    sp = check_sentencepiece(model_bytes, rows)
    log(f"trained a {len(sp)}-piece BPE sentencepiece model on {len(segmented)} texts (twice: same bytes)")

    model_dir = os.path.join(output_root, MODEL_DIR)
    os.makedirs(model_dir, exist_ok=True)
    tokenizer = save_tokenizer(model_bytes, model_dir)
    log(f"saved the GLMChineseTokenizer to {model_dir}: {len(tokenizer)} tokens, special ids from {len(sp)}")

    sources, targets = token_lengths(sp, rows)
    log(describe("source tokens", sources) + "; " + describe("target tokens", targets))
    config = save_config(model_dir, len(tokenizer), max(s + t + 1 for s, t in zip(sources, targets)))
    log(f"saved config.json: {config.num_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
        f"vocab {config.vocab_size}, max_sequence_length {config.max_sequence_length}")


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_root", default=ROOT,
                        help=f"where {DATA_DIR}/ and {MODEL_DIR}/ go (default: the repository)")
    with command(also=(OSError,)), quiet_paddlenlp():
        build(parser.parse_args(argv).output_root)


if __name__ == "__main__":
    main()

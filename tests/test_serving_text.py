"""glm.serving.text: streamed pieces join to exactly the answer's text; stop strings cut it."""

import os

import numpy as np
from conftest import ROOT

from glm.serving.text import AnswerText, ChoiceText
from glm.tokenization import load_tokenizer


def test_pieces_of_random_answers_join_to_the_decoded_answer():
    """Random token sequences (what a random-weight model generates: odd pieces, partial characters,
    spaces) streamed token by token give pieces whose concatenation is decode(tokens).strip()."""
    tokenizer = load_tokenizer(os.path.join(ROOT, "configs", "glm-tiny-chinese"))
    rng = np.random.default_rng(0)
    for _ in range(200):
        tokens = rng.integers(0, len(tokenizer), size=int(rng.integers(1, 24))).tolist()
        text = AnswerText(tokenizer.decode)
        pieces = [text.add(token) for token in tokens]
        pieces.append(text.finish(tokens))
        assert "".join(pieces) == tokenizer.decode(tokens).strip()


def test_a_stop_string_cuts_the_text_even_across_pieces():
    choice = ChoiceText(stops=["。", "END"])
    sent = [choice.answer(piece) for piece in ["红色", "连衣E", "N", "D后面", "不要"]]
    assert "".join(sent) + choice.finish() == "红色连衣"
    assert choice.stopped and sent[1] == "连衣"  # "E" was held back: it could begin "END"
    held = ChoiceText(stops=["END"])
    assert [held.answer("ab E"), held.answer("x")] == ["ab ", "Ex"]  # "E" then "x" cannot begin "END"


def test_several_blanks_stream_as_the_filled_text():
    choice = ChoiceText(segments=["这款", "的裙子，", ""])
    pieces = [choice.begin(), choice.answer("红"), choice.end_blank(0, "色"), choice.answer("好看"), choice.end_blank(1, "")]
    assert "".join(pieces) + choice.finish() == "这款红色的裙子，好看"

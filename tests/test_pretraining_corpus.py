"""Prepared pretraining corpora (glm/pretraining/corpus.py) and the windows cut from them (windows.py):
the documents are the tokenizer's ids, the same input gives the same bytes, bad input is one line, and
windows follow THUDM's BlockDataset."""

import json
import multiprocessing
import os
import signal

import numpy as np
import pytest
from conftest import ROOT, shared_path

from glm.cli.process import exit_on_user_error
from glm.errors import DataError
from glm.pretraining.corpus import (CORPUS_FILE, INDEX_FILE, TOKENS_FILE, _start_worker, open_corpus, prepare_corpus,
                                    read_documents, sentencepiece_model)
from glm.pretraining.objective import sentence_end_table
from glm.pretraining.windows import WindowSampler
from glm.tokenization import load_tokenizer, special_token_ids

TINY = os.path.join(ROOT, "configs", "glm-tiny-chinese")
DEMO_TRAIN = os.path.join(ROOT, "demo_data", "train.json")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def demo_corpus(tokenizer, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("corpora") / "demo")
    prepare_corpus([DEMO_TRAIN], path, tokenizer, text_key="summary")
    return open_corpus(path)


def files_of(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in (TOKENS_FILE, INDEX_FILE, CORPUS_FILE)}


def test_documents_are_the_tokenizers_ids_and_the_same_input_gives_the_same_bytes(tokenizer, demo_corpus, tmp_path):
    rows = [json.loads(line) for line in open(DEMO_TRAIN, encoding="utf-8")]
    assert demo_corpus.num_documents == len(rows)
    for index in (0, 1, 1234, len(rows) - 1):
        assert demo_corpus.document(index).tolist() == tokenizer(rows[index]["summary"], add_special_tokens=False)["input_ids"]
    assert demo_corpus.num_tokens == demo_corpus.offsets[-1] and demo_corpus.metadata["token_dtype"] == "uint16"
    again = str(tmp_path / "again")
    prepare_corpus([DEMO_TRAIN], again, tokenizer, text_key="summary", workers=3)
    assert files_of(again) == files_of(demo_corpus.path)


def test_real_text_with_the_real_tokenizer(tmp_path):
    """People's Daily lines with GLM's Chinese tokenizer: the prepared ids are the tokenizer's own."""
    from paddlenlp.transformers import GLMChineseTokenizer

    source = tmp_path / "sp"
    source.mkdir()
    os.symlink(shared_path("tokenizers", "glm-chinese", "cog-pretrain.model"), source / "cog-pretrain.model")
    GLMChineseTokenizer.from_pretrained(str(source)).save_pretrained(str(tmp_path / "tokenizer"))
    real = load_tokenizer(str(tmp_path / "tokenizer"))
    with open(shared_path("data", "peoples-daily-1998", "text.txt"), encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()][:300]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare_corpus([str(tmp_path / "text.txt")], str(tmp_path / "corpus"), real, workers=2)
    corpus = open_corpus(str(tmp_path / "corpus"))
    for index, line in enumerate(lines):
        assert corpus.document(index).tolist() == real(line, add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        corpus.check_tokenizer(load_tokenizer(TINY), TINY)
    corpus.check_tokenizer(real, "real")


def test_plain_text_blank_line_documents_and_json_lines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # messages name the files as given
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfone\n\n  \ntwo\nthree\n")
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n\n{"body": "y y"}\n', encoding="utf-8")
    lines = [(where, text) for where, text, _ in read_documents(["a.txt", "b.jsonl"], "body")]
    assert lines == [("a.txt:1", "one"), ("a.txt:4", "two"), ("a.txt:5", "three"), ("b.jsonl:1", "x"), ("b.jsonl:3", "y y")]
    paragraphs = [(where, text) for where, text, _ in read_documents(["a.txt"], blank_line_documents=True)]
    assert paragraphs == [("a.txt:1", "one"), ("a.txt:4", "two\nthree")]
    used = sum(size for _, _, size in read_documents(["a.txt"]))
    assert used == os.path.getsize("a.txt") - 3  # every byte but the BOM: the progress bar ends full


@pytest.mark.parametrize(
    "name, content, problem",
    [("a.txt", b"", "a.txt: no documents (the file is empty or holds only whitespace)"),
     ("a.txt", b"\n  \n", "a.txt: no documents (the file is empty or holds only whitespace)"),
     ("a.txt", b"ok\nPK\x03\x04\x00\x00binary\n", "a.txt:2: a NUL byte: a.txt is a binary file, not text"),
     ("a.txt", "好\n坏".encode("gbk"), "a.txt:1: not UTF-8 (byte 0xba at column 1)"),
     ("b.jsonl", b'{"text": "a"\n', "b.jsonl:1: not valid JSON (Expecting ',' delimiter at column 13)"),
     ("b.jsonl", b'["a"]\n', "b.jsonl:1: expected a JSON object, got list"),
     ("b.jsonl", b'{"body": "a"}\n', "b.jsonl:1: no text field 'text' (fields: body); name it with --text_key")],
)  # fmt: skip
def test_bad_input_is_one_line_naming_file_and_line(tokenizer, tmp_path, monkeypatch, name, content, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as error:
        prepare_corpus([name], "out", tokenizer)
    assert str(error.value) == problem
    assert os.listdir(tmp_path) == [name]  # nothing written: no corpus, no staging left


def test_what_is_not_a_whole_corpus_is_refused(demo_corpus, tokenizer, tmp_path):
    with pytest.raises(DataError, match="no such corpus directory"):
        open_corpus(str(tmp_path / "missing"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"is not a prepared corpus \(no corpus.json\): prepare one with"):
        open_corpus(str(tmp_path / "plain"))
    (tmp_path / "plain.partial-999999999").mkdir()  # what a killed preparation (a pid that is gone) left
    with pytest.raises(DataError, match="a preparation into it was interrupted"):
        open_corpus(str(tmp_path / "plain"))
    cut = tmp_path / "cut"
    cut.mkdir()
    for name, data in files_of(demo_corpus.path).items():
        (cut / name).write_bytes(data[: len(data) // 2] if name == TOKENS_FILE else data)
    with pytest.raises(DataError, match="tokens.bin is 73694 bytes, corpus.json says 147388 bytes"):
        open_corpus(str(cut))
    with pytest.raises(DataError, match="already holds a prepared corpus: pass --overwrite"):
        prepare_corpus([DEMO_TRAIN], demo_corpus.path, tokenizer, text_key="summary")


@pytest.fixture(scope="module")
def sampler(demo_corpus, tokenizer):
    return WindowSampler(demo_corpus, 128, special_token_ids(tokenizer), sentence_end_table(tokenizer), seed=7)


def test_windows_are_cls_led_runs_of_whole_documents_cut_at_a_sentence_end(sampler, demo_corpus, tokenizer):
    ids, ends = special_token_ids(tokenizer), sentence_end_table(tokenizer)
    documents = {tuple(demo_corpus.document(i).tolist()) for i in range(demo_corpus.num_documents)}
    for index in range(200):
        window = sampler.window(index)
        assert window[0] == ids.cls and len(window) <= 128
        assert np.array_equal(window, sampler.window(index))  # a pure function of (corpus, seed, index)
        # [CLS] doc <|endoftext|> [CLS] doc ...: every complete piece is a whole document (the documents of
        # the demo text are shorter than a window), the last one a prefix of one, cut at a sentence end.
        pieces = np.split(window, np.flatnonzero(window == ids.eos) + 1)
        for piece in pieces[:-1]:
            assert piece[0] == ids.cls and tuple(piece[1:-1].tolist()) in documents
        tail = pieces[-1].tolist() or [ids.cls]
        assert tail[0] == ids.cls and any(d[: len(tail) - 1] == tuple(tail[1:]) for d in documents)
        assert ends[window[-1]] or window[-1] == ids.eos or len(window) == 128  # or no sentence end near the cut
    assert not np.array_equal(sampler.window(0), WindowSampler(demo_corpus, 128, ids, ends, seed=8).window(0))


def test_long_documents_are_drawn_uniformly_and_entered_at_a_sentence_start(tokenizer, tmp_path):
    """Two documents longer than a window, one three times the other: windows come from each alike (THUDM
    draws a document index) and start at one of its sentence starts."""
    (tmp_path / "docs.txt").write_text("这款上衣很有看点。" * 60 + "\n" + "长裙设计,方便活动。" * 180 + "\n", encoding="utf-8")
    prepare_corpus([str(tmp_path / "docs.txt")], str(tmp_path / "c"), tokenizer)
    corpus = open_corpus(str(tmp_path / "c"))
    ids, ends = special_token_ids(tokenizer), sentence_end_table(tokenizer)
    sampler = WindowSampler(corpus, 64, ids, ends, seed=1)
    documents = [corpus.document(i).tolist() for i in range(2)]
    drawn = [0, 0]
    for index in range(1000):
        window = sampler.window(index).tolist()
        assert len(window) <= 64 and window[0] == ids.cls and ids.eos not in window[:-1]
        starts = [(d, s) for d, doc in enumerate(documents) for s in range(len(doc))
                  if doc[s : s + len(window) - 1] == window[1:]]
        assert starts, f"window {index} is no run of one document"
        document = starts[0][0]  # the periodic text matches at several starts: one must be a sentence start
        assert any(start == 0 or ends[documents[d][start - 1]] for d, start in starts)
        drawn[document] += 1
    assert drawn[0] / 1000 == pytest.approx(0.5, abs=0.05)


def signal_dispositions():
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)


def test_a_worker_ends_at_sigterm_whatever_handler_its_parent_set(tokenizer):
    """Preparation's forked workers drop the parent's SIGTERM handler (exit_on_user_error's raises): with it,
    Pool.terminate after bad input could wait forever for a worker (it hung CI once)."""
    proto = sentencepiece_model(tokenizer).serialized_model_proto()
    with exit_on_user_error():  # what the tool and the driver run under
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        context = multiprocessing.get_context("fork")
        with context.Pool(1, initializer=_start_worker, initargs=(proto, os.getpid())) as pool:
            assert pool.apply(signal_dispositions) == (signal.SIG_DFL, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_child_forked_under_the_stop_handlers_ends_at_the_signal_instead_of_running_on(signum):
    """A pool terminated while it forks a worker signals the worker before its initializer runs: the handler
    it inherited raised there, unwinding the parent's copied stack, and the worker ran on as a second copy
    of the command (a whole second test session, once; the first then waited for it forever)."""
    with exit_on_user_error():
        pid = os.fork()
        if pid == 0:  # the child: the signal before any handler of its own
            try:
                os.kill(os.getpid(), signum)
                signal.sigtimedwait([], 5) if hasattr(signal, "sigtimedwait") else None
            finally:
                os._exit(7)  # reached only when the signal raised in the child instead of ending it
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signum, status

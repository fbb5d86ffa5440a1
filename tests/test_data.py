"""data.py: every bad row stops with `FILE:LINE: what is wrong`, or is skipped and counted."""

import json

import pytest
from test_inputs import CharTokenizer

from data import build_examples, read_rows
from glm.errors import DataError
from glm.jsonl import find_split_file
from glm.inputs import GLMInputBuilder


def write_lines(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode("utf-8") for line in lines) + b"\n")
    return str(path)


def row(**fields):
    return json.dumps(fields, ensure_ascii=False)


@pytest.mark.parametrize(
    "fields, keys",
    [
        ({"src": "a", "tgt": "b"}, ("src", "tgt")),
        ({"content": "类型#上衣", "summary": "一件上衣"}, ("content", "summary")),
        ({"source": "a", "target": "b", "id": 3}, ("source", "target")),
    ],
)
def test_field_pairs_are_detected(tmp_path, fields, keys):
    dataset = read_rows(write_lines(tmp_path / "train.json", [row(**fields)] * 2))
    assert (dataset.source_key, dataset.target_key) == keys
    assert len(dataset.rows) == 2


def test_fields_named_by_flags(tmp_path):
    dataset = read_rows(write_lines(tmp_path / "train.json", [row(q="a", a="b")]), source_key="q", target_key="a")
    assert (dataset.source_key, dataset.target_key) == ("q", "a")


def test_jsonl_name_and_missing_split(tmp_path):
    write_lines(tmp_path / "dev.jsonl", [row(src="a", tgt="b")])
    assert find_split_file(str(tmp_path), "dev").endswith("dev.jsonl")
    with pytest.raises(DataError, match=r"no train.json or train.jsonl"):
        find_split_file(str(tmp_path), "train")
    with pytest.raises(DataError, match=r"no such dataset directory"):
        find_split_file(str(tmp_path / "nope"), "train")


BAD_ROWS = [
    ('{"src": "a", "tgt": }', r"train.json:2: not valid JSON \(Expecting value at column 21\)"),
    ('["a", "b"]', r"train.json:2: expected a JSON object, got list"),
    (row(src="a"), r"train.json:2: no 'tgt' field"),
    (row(src="a", tgt="  "), r"train.json:2: 'tgt' is empty"),
    (row(src=3, tgt="b"), r"train.json:2: 'src' must be a string, got int"),
    (b'{"src": "\xff\xfe", "tgt": "b"}', r"train.json:2: not UTF-8 \(byte 0xff at column 10\)"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_bad_row_stops_with_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "train.json", [row(src="a", tgt="b"), bad, row(src="c", tgt="d")])
    with pytest.raises(DataError, match=f"^{message}$"):
        read_rows(path)


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path):
    lines = [row(src="a", tgt="b")] + [bad for bad, _ in BAD_ROWS] + [row(src="c", tgt="d")]
    dataset = read_rows(write_lines(tmp_path / "train.json", lines), skip_bad_rows=True)
    assert [r["src"] for r in dataset.rows] == ["a", "c"]
    assert dataset.skipped == len(BAD_ROWS)


def test_empty_file_and_unknown_fields(tmp_path):
    (tmp_path / "train.json").write_bytes(b"")
    with pytest.raises(DataError, match=r"^train.json: no usable rows \(the file is empty\)$"):
        read_rows(str(tmp_path / "train.json"))
    with pytest.raises(DataError, match=r"train.json:1: no known source/target fields among \['a', 'b'\]"):
        read_rows(write_lines(tmp_path / "train.json", [row(a="x", b="y")]))
    with pytest.raises(DataError, match=r"missing.json: no such file or directory"):
        read_rows(str(tmp_path / "missing.json"))


def test_prediction_input_needs_no_target(tmp_path):
    dataset = read_rows(write_lines(tmp_path / "in.json", [row(content="类型#裙")]), need_target=False)
    assert (dataset.source_key, dataset.target_key) == ("content", None)


def test_cut_rows_are_counted_once(tmp_path, caplog):
    path = write_lines(tmp_path / "train.json", [row(src="abcabcabc", tgt="x"), row(src="ab", tgt="xyxyxy")] * 3)
    examples = build_examples(read_rows(path), GLMInputBuilder(CharTokenizer(), src_length=6, tgt_length=4))
    assert sum(e.source_truncated for e in examples) == 3 and sum(e.target_truncated for e in examples) == 3
    err = caplog.text
    assert err.count("3 of 6 sources cut to src_length=6") == 1
    assert err.count("3 of 6 targets cut to tgt_length=4") == 1


def test_a_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(b"\xef\xbb\xbf" + row(src="a", tgt="b").encode() + b"\n")
    assert read_rows(str(path)).rows == [{"src": "a", "tgt": "b"}]


def test_a_whitespace_only_file_is_called_so(tmp_path):
    (tmp_path / "train.json").write_bytes(b"  \n\t\n")
    with pytest.raises(DataError, match=r"^train.json: no usable rows \(the file holds only whitespace\)$"):
        read_rows(str(tmp_path / "train.json"))


def test_a_split_that_is_a_directory_is_called_so(tmp_path):
    (tmp_path / "train.json").mkdir()
    with pytest.raises(DataError, match=r"train.json is a directory, not a JSON Lines file"):
        find_split_file(str(tmp_path), "train")


def test_a_json_array_file_is_read_as_its_items(tmp_path, caplog):
    (tmp_path / "train.json").write_text(json.dumps([{"src": "a", "tgt": "b"}, {"src": "c", "tgt": "d"}], indent=2))
    assert read_rows(str(tmp_path / "train.json")).rows == [{"src": "a", "tgt": "b"}, {"src": "c", "tgt": "d"}]
    assert "one JSON array, not JSON Lines" in caplog.text
    (tmp_path / "train.json").write_text('[{"src": "a", "tgt": "b"},\n{"src": "c"')  # a broken array
    with pytest.raises(DataError, match=r"train.json:1: not valid JSON .*expected JSON Lines, one object per line"):
        read_rows(str(tmp_path / "train.json"))
    (tmp_path / "train.json").write_text('[{"src": "a", "tgt": "b"}, 3]')
    with pytest.raises(DataError, match=r"train.json: item 2: expected a JSON object, got int"):
        read_rows(str(tmp_path / "train.json"))


def test_the_share_of_unknown_tokens_is_reported_once(tmp_path, caplog):
    path = write_lines(tmp_path / "train.json", [row(src="a?", tgt="x"), row(src="ab", tgt="y?")])
    build_examples(read_rows(path), GLMInputBuilder(CharTokenizer(), src_length=8, tgt_length=4))
    assert caplog.text.count("train.json: 2 of 15 tokens (13.33%) are unknown") == 1

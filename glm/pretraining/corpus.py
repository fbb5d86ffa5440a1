"""A prepared pretraining corpus: documents tokenized once and stored as a memory-mapped token file plus a
document index (the Megatron / PaddleNLP `.bin` + `.idx` idea), with a metadata file naming the tokenizer.

    DIR/tokens.bin   every document's token ids back to back (uint16 when the vocabulary fits, else int32)
    DIR/tokens.idx   int64 offsets, documents + 1 of them: document i is tokens[idx[i]:idx[i + 1]]
    DIR/corpus.json  the format, counts, the token dtype and the tokenizer's fingerprint

Preparation writes into `DIR.partial-PID` and renames it to `DIR` only when every file is on disk
(glm.files.staged_directory), so a killed preparation leaves nothing training would accept (`open_corpus`
refuses a directory without a complete corpus.json), and the next preparation removes what it left. Reading maps both files: a window reads the pages it touches, never the whole corpus.

Documents are tokenized with the tokenizer's sentencepiece model as plain text: a literal "[MASK]" or
"<|endoftext|>" in the text stays text, so no document can smuggle a special token (an <|endoftext|>
inside a document would break the document boundaries the objective relies on).
"""

import collections
import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time
from array import array
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from paddlenlp.utils.log import logger

from ..errors import DataError
from ..files import crash_point, file_sha256, fsync_file, leftover_pid, process_alive, staged_directory
from ..jsonl import decode_line, parse_json_line

__all__ = [
    "CORPUS_FILE", "TOKENS_FILE", "INDEX_FILE", "FORMAT", "PretrainingCorpus", "open_corpus", "prepare_corpus",
    "describe_preparation", "ensure_corpus", "read_documents", "tokenizer_fingerprint",
]  # fmt: skip

CORPUS_FILE = "corpus.json"
TOKENS_FILE = "tokens.bin"
INDEX_FILE = "tokens.idx"
FORMAT = "glm-paddle pretraining corpus"
VERSION = 1
UTF8_BOM = b"\xef\xbb\xbf"
JSON_LINES_SUFFIXES = (".jsonl", ".json")
CHUNK_DOCUMENTS = 512  # documents per worker task: large enough to amortise the inter-process transfer


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides the ids: the sentencepiece model (pieces and normaliser) and the added
    special tokens with their ids. The same tokenizer saved again (e.g. beside a checkpoint, with another
    tokenizer_config.json) keeps its fingerprint."""
    digest = hashlib.sha256(sentencepiece_model(tokenizer).serialized_model_proto())
    digest.update(json.dumps(sorted(tokenizer.get_added_vocab().items()), ensure_ascii=False).encode("utf-8"))
    digest.update(str(len(tokenizer)).encode("ascii"))
    return digest.hexdigest()


def sentencepiece_model(tokenizer):
    model = getattr(tokenizer, "sp_model", None)
    if model is None:
        raise DataError(
            f"{type(tokenizer).__name__} has no sentencepiece model: pretraining corpora are prepared with GLM's "
            "Chinese tokenizer (GLMChineseTokenizer)"
        )
    return model


# ---------------------------------------------------------------------------------------------------------
# Reading the input: (where, text, bytes) per document, streamed, so a corpus never has to fit in memory.


def read_documents(paths: Sequence[str], text_key: str = "text", blank_line_documents: bool = False
                   ) -> Iterator[Tuple[str, str, int]]:
    """Each document of the input files as (FILE:LINE of its first line, text, bytes of input it used).
    Plain text holds one document per line, or with `blank_line_documents` documents of several lines
    separated by empty lines (joined with newlines); `.jsonl`/`.json` files hold one JSON object a line
    with the text under `text_key`. A binary file, a non-UTF-8 line, a bad JSON row or a file without a
    document is a DataError naming the file and line."""
    for path in paths:
        json_lines = path.endswith(JSON_LINES_SUFFIXES)
        count = 0
        for where, text, used in _documents_of(path, json_lines, text_key, blank_line_documents):
            count += 1
            yield where, text, used
        if count == 0:
            raise DataError(f"{path}: no documents (the file is empty or holds only whitespace)")


def _documents_of(path, json_lines, text_key, blank_line_documents):
    name = path  # as given: corpora often hold files of one name in several directories
    paragraph, start, held = [], None, 0
    for number, raw in _lines(path):
        where = f"{name}:{number}"
        if b"\x00" in raw:
            raise DataError(f"{where}: a NUL byte: {name} is a binary file, not text")
        held += len(raw)
        text = decode_line(raw, where).rstrip("\r\n")
        if json_lines:
            if text.strip():
                yield where, _json_text(raw.rstrip(b"\r\n"), where, text_key), held
                held = 0
        elif blank_line_documents:
            if text.strip():
                paragraph.append(text)
                start = start or where
            elif paragraph:
                yield start, "\n".join(paragraph), held
                paragraph, start, held = [], None, 0
        elif text.strip():
            yield where, text, held
            held = 0
    if paragraph:
        yield start, "\n".join(paragraph), held


def _lines(path) -> Iterator[Tuple[int, bytes]]:
    try:
        f = open(path, "rb")
    except OSError as error:
        raise DataError(f"{path}: {error.strerror.lower()}") from None
    with f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM) :]
            yield number, raw


def _json_text(raw: bytes, where: str, text_key: str) -> str:
    row = parse_json_line(raw, where)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text = row.get(text_key)
    if not isinstance(text, str):
        found = f"fields: {', '.join(sorted(row))}" if row else "an empty object"
        raise DataError(f"{where}: no text field {text_key!r} ({found}); name it with --text_key")
    return text


# ---------------------------------------------------------------------------------------------------------
# Tokenizing in worker processes, in input order.

_encoder = None  # a worker's sentencepiece processor


def _start_worker(model_proto: bytes, parent: Optional[int] = None):
    global _encoder
    import sentencepiece

    _encoder = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    if parent is not None:
        # A forked worker inherits the parent's Python handlers: exit_on_user_error's SIGTERM handler would
        # raise in it, and Pool.terminate (bad input, an interrupt) then waited forever for a worker stuck
        # reporting it (seen in CI: the traceback's write blocked on a lock held at the fork). The signal
        # must just end it; Ctrl-C reaches the whole process group and is the parent's to handle.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # a worker of a killed preparation leaves too (it would wait for tasks forever)
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int):
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _encode(texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """The texts' ids back to back (int32) and each text's length: two arrays cross the process boundary
    far faster than lists of lists."""
    ids = _encoder.encode(texts)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return np.fromiter((i for x in ids for i in x), dtype=np.int32, count=int(lengths.sum())), lengths


def _chunks(documents: Iterator[Tuple[str, str, int]]) -> Iterator[Tuple[List[str], int]]:
    texts, used = [], 0
    for _, text, size in documents:
        texts.append(text)
        used += size
        if len(texts) == CHUNK_DOCUMENTS:
            yield texts, used
            texts, used = [], 0
    if texts:
        yield texts, used


def _encoded_in_order(chunks, model_proto: bytes, workers: int):
    """(ids, lengths, bytes) per chunk, in input order, with at most a few chunks in flight per worker
    (Pool.imap would read the whole input ahead)."""
    if workers <= 1:
        _start_worker(model_proto)
        for texts, used in chunks:
            yield (*_encode(texts), used)
        return
    context = multiprocessing.get_context("fork")  # workers inherit the loaded model; no re-import
    with context.Pool(workers, initializer=_start_worker, initargs=(model_proto, os.getpid())) as pool:
        pending = collections.deque()
        for texts, used in chunks:
            pending.append((pool.apply_async(_encode, (texts,)), used))
            if len(pending) >= 4 * workers:
                result, size = pending.popleft()
                yield (*result.get(), size)
        while pending:
            result, size = pending.popleft()
            yield (*result.get(), size)


# ---------------------------------------------------------------------------------------------------------
# Writing.


def prepare_corpus(paths: Sequence[str], output_dir: str, tokenizer, text_key: str = "text",
                   blank_line_documents: bool = False, workers: int = 1, overwrite: bool = False,
                   progress: Optional[Callable[[int], None]] = None) -> dict:
    """Tokenizes the documents of `paths` into a prepared corpus at `output_dir` and returns its metadata.
    `progress(n)` is told the bytes of input consumed. Same input and tokenizer, same bytes (any number
    of workers)."""
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file" + (" (a directory: name its files)" if os.path.isdir(path) else ""))
    _check_output(output_dir, overwrite)
    model = sentencepiece_model(tokenizer)
    # A kill leaves DIR.partial-PID only; bad input or an interrupt leaves nothing.
    with staged_directory(output_dir, report=logger.warning, crash_name="prepare") as staged:
        return _write_corpus(paths, staged, tokenizer, model, text_key, blank_line_documents, workers, progress)


def _write_corpus(paths, staged, tokenizer, model, text_key, blank_line_documents, workers, progress) -> dict:
    dtype = np.dtype("uint16") if len(tokenizer) <= 2**16 else np.dtype("int32")
    offsets, unknown = array("q", [0]), 0
    documents = read_documents(paths, text_key, blank_line_documents)
    with open(os.path.join(staged, TOKENS_FILE), "wb") as tokens_file:
        for ids, lengths, used in _encoded_in_order(_chunks(documents), model.serialized_model_proto(), workers):
            tokens_file.write(ids.astype(dtype).tobytes())
            offsets.extend((offsets[-1] + np.cumsum(lengths)).tolist())
            unknown += int((ids == model.unk_id()).sum())
            if progress:
                progress(used)
            crash_point("prepare:chunk-written")
        fsync_file(tokens_file)
    with open(os.path.join(staged, INDEX_FILE), "wb") as index_file:
        index_file.write(np.frombuffer(offsets, dtype=np.int64).tobytes())
        fsync_file(index_file)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "token_dtype": dtype.name,
        "documents": len(offsets) - 1,
        "tokens": offsets[-1],
        "unk_tokens": unknown,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "class": type(tokenizer).__name__,
                      "vocab_size": len(tokenizer)},
        "inputs": [{"path": path, "bytes": os.path.getsize(path), "sha256": file_sha256(path)} for path in paths],
        "text_key": text_key,
        "blank_line_documents": blank_line_documents,
    }  # fmt: skip
    with open(os.path.join(staged, CORPUS_FILE), "w", encoding="utf-8") as f:
        json.dump(metadata, f, ensure_ascii=False, indent=2)
        f.write("\n")
        fsync_file(f)
    return metadata


def ensure_corpus(path: str, inputs: Sequence[str], tokenizer, text_key: str = "text") -> bool:
    """A corpus at `path` from `inputs` and `tokenizer`: the one already there if it was prepared from
    these very input bytes with this tokenizer, else prepared afresh (returns True then)."""
    try:
        metadata = open_corpus(path).metadata
        if ([source["sha256"] for source in metadata["inputs"]] == [file_sha256(p) for p in inputs]
                and metadata["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer)
                and metadata["text_key"] == text_key):
            return False
    except DataError:
        pass  # absent, interrupted or torn: prepared again below
    prepare_corpus(inputs, path, tokenizer, text_key=text_key, overwrite=True)
    return True


def describe_preparation(metadata: dict, output_dir: str) -> str:
    """The closing summary: documents, tokens, the [UNK] share, bytes in and out."""
    tokens = metadata["tokens"]
    written = sum(os.path.getsize(os.path.join(output_dir, name)) for name in (TOKENS_FILE, INDEX_FILE))
    read = sum(source["bytes"] for source in metadata["inputs"])
    return (f"{metadata['documents']:,} documents, {tokens:,} tokens ([UNK] {100 * metadata['unk_tokens'] / max(tokens, 1):.2f} %), "
            f"{read / 2**20:.1f} MiB of text -> {written / 2**20:.1f} MiB ({metadata['token_dtype']} tokens)")


def _check_output(output_dir: str, overwrite: bool):
    if not os.path.exists(output_dir):
        return
    if not os.path.isdir(output_dir):
        raise DataError(f"--output_dir {output_dir} is a file")
    if os.listdir(output_dir) and not overwrite:
        what = "a prepared corpus" if os.path.exists(os.path.join(output_dir, CORPUS_FILE)) else "files"
        raise DataError(f"--output_dir {output_dir} already holds {what}: pass --overwrite to replace it, or another directory")


# ---------------------------------------------------------------------------------------------------------
# Reading.


def _staged_note(path: str) -> str:
    """What a preparation into `path` that did not finish left beside it, said for the user."""
    parent, name = os.path.split(os.path.abspath(path))
    pids = [leftover_pid(entry, name) for entry in (os.listdir(parent) if os.path.isdir(parent) else [])]
    pids = [pid for pid in pids if pid is not None]
    if any(process_alive(pid) for pid in pids):
        return f"; it is being prepared (pid {next(pid for pid in pids if process_alive(pid))}): wait for it"
    if pids:
        return "; a preparation into it was interrupted: run it again"
    return ": prepare one with tools/prepare_pretraining_data.py"


class PretrainingCorpus:
    """A prepared corpus, memory-mapped: `document(i)` is a read-only view of its token ids."""

    def __init__(self, path: str, metadata: dict):
        self.path, self.metadata = path, metadata
        self.num_documents, self.num_tokens = metadata["documents"], metadata["tokens"]
        self.tokens = np.memmap(os.path.join(path, TOKENS_FILE), dtype=metadata["token_dtype"], mode="r",
                                shape=(self.num_tokens,))
        self.offsets = np.memmap(os.path.join(path, INDEX_FILE), dtype=np.int64, mode="r",
                                 shape=(self.num_documents + 1,))

    @property
    def window_tokens(self) -> int:
        """The tokens windows are cut from: the documents, each with its [CLS] and <|endoftext|>."""
        return self.num_tokens + 2 * self.num_documents

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def check_tokenizer(self, tokenizer, tokenizer_path: str):
        recorded = self.metadata["tokenizer"]["fingerprint"]
        if tokenizer_fingerprint(tokenizer) != recorded:
            raise DataError(
                f"{self.path} was prepared with another tokenizer than {tokenizer_path}'s (fingerprint "
                f"{recorded[:12]}, not {tokenizer_fingerprint(tokenizer)[:12]}): prepare it again with "
                f"--model_name_or_path {tokenizer_path}"
            )

    def describe(self) -> str:
        return f"{self.num_documents:,} documents, {self.num_tokens:,} tokens"


def open_corpus(path: str) -> PretrainingCorpus:
    """The prepared corpus at `path`, checked whole; a DataError saying what is wrong otherwise."""
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such corpus directory (prepare one with tools/prepare_pretraining_data.py)")
    metadata_path = os.path.join(path, CORPUS_FILE)
    if not os.path.isfile(metadata_path):
        raise DataError(f"{path} is not a prepared corpus (no {CORPUS_FILE})" + _staged_note(path))
    try:
        with open(metadata_path, encoding="utf-8") as f:
            metadata = json.load(f)
        known = metadata["format"] == FORMAT and metadata["version"] == VERSION
        counts = (metadata["documents"], metadata["tokens"], np.dtype(metadata["token_dtype"]).itemsize)
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{metadata_path}: not a corpus description written by tools/prepare_pretraining_data.py") from None
    if not known:
        raise DataError(f"{metadata_path}: format {metadata['format']!r} version {metadata['version']}, expected {FORMAT!r} version {VERSION}")
    documents, tokens, itemsize = counts
    for name, size in ((TOKENS_FILE, tokens * itemsize), (INDEX_FILE, (documents + 1) * 8)):
        file = os.path.join(path, name)
        actual = os.path.getsize(file) if os.path.isfile(file) else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes"
            raise DataError(f"{path}: {name} is {found}, {CORPUS_FILE} says {size} bytes: prepare the corpus again")
    return PretrainingCorpus(path, metadata)

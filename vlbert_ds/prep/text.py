"""`vlbert-prep text`: text corpora -> pre-tokenised text segments.

Inputs: plain-text files (one paragraph per line), or tables of documents as Hugging Face `datasets`
exports them: parquet, or JSONL (plain or compressed), a document per row in `--text-field` (default
`text`), its paragraphs separated by newlines. Tables are streamed (parquet a row group at a time, JSONL
by line), so memory does not grow with the corpus; rows that are not usable (no such field, not a
string, empty, a line that is not JSON) are counted by reason.

As the official `GeneralCorpus` (reference §2.1): every non-empty paragraph starts a segment, which takes
the following paragraphs until it holds at least `min_basic_tokens` (64) basic-tokenizer words,
wrapping around the corpus; the segment is stored WordPiece-tokenised, capped at `max_wordpieces` ids
(the loader truncates to 64). A paragraph longer than `8 x max_wordpieces` words is read up to that many:
each word gives at least one WordPiece, so nothing beyond can reach a segment (unless normalisation
deletes seven words in eight of a line), and a 1 MB paragraph does not sit in memory once per segment
that holds it.
"""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import numpy as np

from vlbert_ds.data.schema import SampleError, TextRecord, encode_text
from vlbert_ds.prep.lazy import LazyTools
from vlbert_ds.prep.writer import ShardJob

WORDS_PER_WORDPIECE_CAP = 8
TABLE_BATCH_ROWS = 256
# What BERT's normaliser and pre-tokeniser treat as whitespace (" ", \t, \n, \r and Unicode Zs): a line cut
# at one of these gives a prefix of the line's basic tokens (Python's split() also splits at control
# characters, which BERT deletes, so it could cut inside a BERT word).
_BERT_SPACE = re.compile(r"[ \t\n\r\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")


def first_words(line: str, count: int) -> tuple[str, bool]:
    """(the line up to the end of its first `count` whitespace-separated words, whether it was cut)."""
    seen = 0
    for match in _BERT_SPACE.finditer(line):
        if match.start() == 0:
            continue
        seen += 1
        if seen >= count:
            return line[: match.start()], match.end() < len(line)
    return line, False


def expand_inputs(urls: list[str]) -> list[str]:
    """The input files: each URL as given, or the files a glob (`*`, `?`, `[`) matches, sorted."""
    files = []
    for url in urls:
        if not any(ch in url for ch in "*?["):
            files.append(url)
            continue
        fs, path = fsspec.core.url_to_fs(url)
        protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
        matched = sorted(m if not protocol or m.startswith(protocol) else protocol + m for m in fs.glob(path))
        if not matched:
            raise ValueError(f"{url}: matches no file")
        files += matched
    return files


def input_format(url: str) -> str:
    """parquet, jsonl or text, from the name (compression suffixes aside)."""
    lower = url.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        lower = lower.removesuffix(suffix)
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    return "text"


def iter_documents(url: str, text_field: str, counts: Counter) -> Iterator[str]:
    """The documents of one input file; unusable rows are counted in `counts` by reason."""
    kind = input_format(url)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(url, "rb") as handle:
            table = pq.ParquetFile(handle)
            names = table.schema_arrow.names
            if text_field not in names:
                raise ValueError(f"{url}: no column {text_field!r} (it has {', '.join(names[:12])}); "
                                 "name the text column with --text-field")
            # One row group at a time (pyarrow's iter_batches holds on to what it read: its memory grew with
            # the file, 450 MB over a 600 MB one), in record batches of TABLE_BATCH_ROWS documents.
            for group in range(table.num_row_groups):
                for batch in table.read_row_group(group, columns=[text_field]).to_batches(TABLE_BATCH_ROWS):
                    for value in batch.column(0).to_pylist():
                        counts["documents"] += 1
                        yield from _usable(value, counts)
        return
    if kind == "jsonl":
        with fsspec.open(url, "rt", encoding="utf-8", errors="replace", compression="infer") as handle:
            for line in handle:
                if not line.strip():
                    continue
                counts["documents"] += 1
                try:
                    record = json.loads(line)
                except ValueError:
                    counts["malformed_row"] += 1
                    continue
                if not isinstance(record, dict):
                    counts["malformed_row"] += 1
                elif text_field not in record:
                    counts["missing_text_field"] += 1
                else:
                    yield from _usable(record[text_field], counts)
        return
    with fsspec.open(url, "rt", encoding="utf-8", errors="replace", compression="infer") as handle:
        counts["documents"] += 1
        for line in handle:
            yield line


def _usable(value: Any, counts: Counter) -> Iterator[str]:
    if not isinstance(value, str):
        counts["non_string_text"] += 1
    elif not value.strip():
        counts["empty_text"] += 1
    else:
        yield value


def iter_paragraphs(urls: list[str], text_field: str = "text", counts: Counter | None = None,
                    max_words: int | None = None) -> Iterator[str]:
    """Non-empty lines of every document, in input order, each cut to its first `max_words` words."""
    counts = Counter() if counts is None else counts
    for url in urls:
        for document in iter_documents(url, text_field, counts):
            for line in document.split("\n"):
                line = line.strip()
                if not line:
                    continue
                if max_words is not None and len(line) > max_words:  # (a line of fewer characters is shorter)
                    line = first_words(line, max_words)[0]
                yield line


def read_paragraphs(urls: list[str], text_field: str = "text") -> list[str]:
    return list(iter_paragraphs(urls, text_field))


def _words(paragraph: str, enough: int) -> int:
    return len(paragraph.split(None, enough))


def stream_windows(paragraphs: Iterable[str], min_basic_tokens: int = 64) -> Iterator[list[str]]:
    """For each paragraph, it and the following ones (wrapping to the corpus' start) until they hold
    >= `min_basic_tokens` words; streamed, holding only the paragraphs a window still needs.

    Whitespace words never outnumber basic-tokenizer words (punctuation only splits further), so a
    window long enough by whitespace is long enough after basic tokenisation.
    """
    pending: deque[tuple[str, int]] = deque()  # paragraphs from the oldest window start still open
    pending_words = 0
    opening: list[tuple[str, int]] = []  # the corpus' first paragraphs, for the windows that wrap
    opening_words = 0
    total = 0
    for paragraph in paragraphs:
        count = _words(paragraph, min_basic_tokens)
        total += 1
        if opening_words < min_basic_tokens:
            opening.append((paragraph, count))
            opening_words += count
        pending.append((paragraph, count))
        pending_words += count
        while pending and pending_words >= min_basic_tokens:
            window, words = [], 0
            for text, words_here in pending:
                window.append(text)
                words += words_here
                if words >= min_basic_tokens:
                    break
            yield window
            pending_words -= pending.popleft()[1]
    # The last windows wrap around to the corpus' start (each paragraph at most once per window).
    tail = list(pending)
    for start in range(len(tail)):
        window, words = [], 0
        for text, words_here in tail[start:] + opening:
            if len(window) == total:
                break
            window.append(text)
            words += words_here
            if words >= min_basic_tokens:
                break
        yield window


def segment_windows(paragraphs: list[str], min_basic_tokens: int = 64) -> list[list[str]]:
    return list(stream_windows(paragraphs, min_basic_tokens))


class TextJobs:
    """The shard jobs of a text corpus, read afresh at each call (`writer.JobSource`); `inputs` counts
    the documents read and the unusable ones of the last full pass."""

    def __init__(self, urls: list[str], text_field: str, min_basic_tokens: int, max_wordpieces: int,
                 samples_per_shard: int) -> None:
        self.urls, self.text_field = urls, text_field
        self.min_basic_tokens, self.max_wordpieces = min_basic_tokens, max_wordpieces
        self.samples_per_shard = samples_per_shard
        self.inputs: dict[str, int] = {}

    def __call__(self) -> Iterator[ShardJob]:
        counts: Counter = Counter()
        paragraphs = iter_paragraphs(self.urls, self.text_field, counts,
                                     WORDS_PER_WORDPIECE_CAP * self.max_wordpieces)
        batch: list[list[str]] = []
        index = first = 0
        for number, window in enumerate(stream_windows(paragraphs, self.min_basic_tokens)):
            if not batch:
                first = number
            batch.append(window)
            if len(batch) == self.samples_per_shard:
                yield ShardJob(index, batch, first)
                index, batch = index + 1, []
        if batch:
            yield ShardJob(index, batch, first)
        self.inputs = {"documents": counts.pop("documents", 0), **dict(sorted(counts.items()))}


class TextSegmentMaker(LazyTools):
    """Tokenises one window into a segment; picklable, tokenizer loaded lazily per process."""

    def __init__(self, tokenizer: str, min_basic_tokens: int = 64, max_wordpieces: int = 128) -> None:
        self.tokenizer_folder = tokenizer
        self.min_basic_tokens, self.max_wordpieces = min_basic_tokens, max_wordpieces
        self._tokenizer = None

    def _basic_tokens(self, text: str) -> list[str]:
        backend = self.tokenizer.backend_tokenizer
        return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]

    def __call__(self, window: list[str], shard: int, position: int) -> list[dict[str, Any]]:
        # Every basic token gives at least one WordPiece, so only a segment's first `max_wordpieces` basic
        # tokens can reach it: each line is tokenised up to there (the whole line only when normalisation
        # deleted words of that prefix), which gives the ids of tokenising everything, then truncating.
        words: list[str] = []
        for line in window:
            need = max(self.max_wordpieces - len(words), 1)
            head, cut = first_words(line, need)
            tokens = self._basic_tokens(head)
            if cut and len(tokens) < need:
                tokens = self._basic_tokens(line)
            words += tokens
            if len(words) >= self.min_basic_tokens:
                break
        if not words:
            raise SampleError("empty_text")
        words = words[: self.max_wordpieces]
        ids = self.tokenizer(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]
        if not ids:
            raise SampleError("empty_text")
        tokens = np.asarray(ids[: self.max_wordpieces], dtype=np.int32)
        return [encode_text(TextRecord(key=f"{shard:06d}_{position:06d}", tokens=tokens))]

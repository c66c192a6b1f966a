"""`vlbert-prep text`: plain-text files (one paragraph per line) -> pre-tokenised text segments.

As the official `GeneralCorpus` (reference §2.1): every non-empty line starts a segment, which takes
the following lines until it holds at least `min_basic_tokens` (64) basic-tokenizer words, wrapping
around the corpus; the segment is stored WordPiece-tokenised, capped at `max_wordpieces` ids
(the loader truncates to 64). Segments are made per shard in worker processes.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np

from vlbert_ds.data.schema import SampleError, TextRecord, encode_text
from vlbert_ds.prep.lazy import LazyTools


def read_paragraphs(urls: list[str]) -> list[str]:
    paragraphs: list[str] = []
    for url in urls:
        with fsspec.open(url, "rt", encoding="utf-8", errors="replace") as handle:
            paragraphs += [line.strip() for line in handle if line.strip()]
    return paragraphs


def segment_windows(paragraphs: list[str], min_basic_tokens: int = 64) -> list[list[str]]:
    """For each paragraph, it and the following ones (wrapping) until >= `min_basic_tokens` words.

    Whitespace words never outnumber basic-tokenizer words (punctuation only splits further), so a
    window long enough by whitespace is long enough after basic tokenisation.
    """
    windows = []
    counts = [len(p.split()) for p in paragraphs]
    for start in range(len(paragraphs)):
        window, total, index = [], 0, start
        for _ in range(len(paragraphs)):
            window.append(paragraphs[index])
            total += counts[index]
            if total >= min_basic_tokens:
                break
            index = (index + 1) % len(paragraphs)
        windows.append(window)
    return windows


class TextSegmentMaker(LazyTools):
    """Tokenises one window into a segment; picklable, tokenizer loaded lazily per process."""

    def __init__(self, tokenizer: str, min_basic_tokens: int = 64, max_wordpieces: int = 128) -> None:
        self.tokenizer_folder = tokenizer
        self.min_basic_tokens, self.max_wordpieces = min_basic_tokens, max_wordpieces
        self._tokenizer = None

    def __call__(self, window: list[str], shard: int, position: int) -> list[dict[str, Any]]:
        backend = self.tokenizer.backend_tokenizer
        words: list[str] = []
        for line in window:
            words += [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line))]
            if len(words) >= self.min_basic_tokens:
                break
        if not words:
            raise SampleError("empty_text")
        ids = self.tokenizer(words, is_split_into_words=True, add_special_tokens=False)["input_ids"]
        if not ids:
            raise SampleError("empty_text")
        tokens = np.asarray(ids[: self.max_wordpieces], dtype=np.int32)
        return [encode_text(TextRecord(key=f"{shard:06d}_{position:06d}", tokens=tokens))]

"""Row makers run in worker processes: they pickle cheaply and load heavy tools once per process."""

from __future__ import annotations

from typing import Any


class LazyTools:
    """Base for picklable row makers. Attributes named in `LAZY` are dropped when pickled and rebuilt
    on first use in each process; `tokenizer` is the common one."""

    LAZY: tuple[str, ...] = ("_tokenizer",)
    tokenizer_folder: str
    _tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, **dict.fromkeys(self.LAZY)}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import BertTokenizerFast

            self._tokenizer = BertTokenizerFast.from_pretrained(self.tokenizer_folder)
            self._tokenizer.model_max_length = 1 << 30  # we tokenise long segments on purpose
        return self._tokenizer

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

    def fingerprint(self) -> dict[str, Any]:
        """The options that shape the output (for prep resume): the tokenizer by its files' content,
        not by where it is installed."""
        options = {k: v for k, v in self.__dict__.items() if k not in self.LAZY}
        if "tokenizer_folder" in options:
            options["tokenizer_folder"] = tokenizer_digest(options["tokenizer_folder"])
        return {"__type__": type(self).__name__, **options}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import BertTokenizerFast

            self._tokenizer = BertTokenizerFast.from_pretrained(self.tokenizer_folder)
            self._tokenizer.model_max_length = 1 << 30  # we tokenise long segments on purpose
        return self._tokenizer


def tokenizer_digest(folder: str) -> str:
    """sha256 over a tokenizer folder's vocabulary and settings files (what decides the token ids)."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()

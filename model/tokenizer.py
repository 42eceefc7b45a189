"""A checkpoint's `tokenizer.json` through the `tokenizers` library: the one loader, for serving and evaluation."""

from __future__ import annotations

import os


class Tokenizer:
    """`tokenizer.json` through the `tokenizers` library."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _T

        self._t = _T.from_file(path)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | None) -> "Tokenizer | None":
        p = os.path.join(checkpoint, "tokenizer.json") if checkpoint else ""
        return cls(p) if p and os.path.exists(p) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._t.encode(text, add_special_tokens=add_special_tokens).ids

    def id_to_token(self, i: int) -> str | None:
        return self._t.id_to_token(int(i))

    def decode(self, ids: list[int]) -> str:
        return self._t.decode(ids)

    def to_json(self) -> str:
        """The tokenizer as `tokenizer.json` text (what grammar engines read)."""
        return self._t.to_str()

    @property
    def vocab_size(self) -> int:
        return self._t.get_vocab_size()

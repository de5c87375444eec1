"""The tokenizer: a thin wrapper over ``tokenizers``' byte-level BPE, with each token's bytes
(for token healing, whole-character text, and the lookup's token alignment)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from codegen_ls.errors import ModelError


class Tokenizer:
    """Thin wrapper over a ``tokenizers`` byte-level tokenizer, with per-token byte strings."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise ModelError(f"cannot load tokenizer {path}: {exc}") from None
        self._token_bytes: list[bytes] | None = None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))

    def text_of(self, ids: Sequence[int], skip: bytes = b"") -> str:
        """The text of generated ``ids`` up to its last whole character: the first bytes of a
        character the next token would complete, and bytes that are not UTF-8, are left out, never
        shown as U+FFFD (an accept would insert that into the file). ``skip``: leading bytes to
        drop when the ids start with them (the prompt text token healing regenerates), so the text
        starts on a character boundary too."""
        table = self.token_bytes()
        data = b"".join(table[i] if 0 <= i < len(table) else b"" for i in ids)
        if skip and data.startswith(skip):
            data = data[len(skip) :]
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:  # a character cut off, or not UTF-8: the text before it
            return data[: exc.start].decode("utf-8")

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for (byte-level BPE alphabet mapped back)."""
        if self._token_bytes is None:
            from tokenizers import pre_tokenizers

            alphabet = pre_tokenizers.ByteLevel.alphabet()
            # GPT-2 byte<->unicode table, rebuilt here so we need no transformers import.
            bs = (
                list(range(ord("!"), ord("~") + 1))
                + list(range(ord("¡"), ord("¬") + 1))
                + list(range(ord("®"), ord("ÿ") + 1))
            )
            cs = bs[:]
            n = 0
            for b in range(256):
                if b not in bs:
                    bs.append(b)
                    cs.append(256 + n)
                    n += 1
            byte_of = {chr(c): b for b, c in zip(bs, cs)}
            assert set(byte_of) >= set(alphabet)
            vocab = self._tok.get_vocab(with_added_tokens=True)
            table = [b""] * max(self.vocab_size, max(vocab.values()) + 1)
            for piece, i in vocab.items():
                if all(ch in byte_of for ch in piece):
                    table[i] = bytes(byte_of[ch] for ch in piece)
                else:  # added/special token stored verbatim
                    table[i] = piece.encode()
            self._token_bytes = table
        return self._token_bytes

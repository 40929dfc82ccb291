"""Incremental detokenization, stop strings, and the strings that name tokens in logprobs.

`IncrementalDetokenizer` turns one token at a time into new text: with a `tokenizers` backend (every fast
Hugging Face tokenizer) it is the library's own `DecodeStream`, which buffers a UTF-8 character split across
byte tokens until it is complete; other tokenizers (e.g. the tests' character tokenizer) use the
prefix/read-offset scheme of Hugging Face TGI and vLLM (`detokenize_incrementally`) over `decode`. Each
step costs O(1) in the length of the text, never a re-decode of the whole output.

Token strings in logprobs (`TokenNames`) follow OpenAI's convention for byte-level tokens that are not valid
UTF-8 on their own (a piece of an emoji): the name is `bytes:` followed by the token's bytes as `\\xNN`
escapes (e.g. `bytes:\\xf0\\x9f`), so two different byte tokens never share a key in `top_logprobs`. A
valid token is named by its decoded text; should two different ids still decode to the same text in one
`top_logprobs` entry, the later ones are named `token_id:N` (vLLM's spelling).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import ByteLevel, DecodeStream

_CONTEXT = 4  # prompt tokens given to a stream as context (leading-space rules of some decoders)


def backend(tokenizer: object) -> Tokenizer | None:
    """The `tokenizers.Tokenizer` behind a Hugging Face tokenizer, or None."""
    bt = getattr(tokenizer, "backend_tokenizer", None)
    return bt if isinstance(bt, Tokenizer) else None


class IncrementalDetokenizer:
    """New text for each new token id; `prompt_ids` give context only (their text is not returned).

    `step` also returns the token's offset: characters of this detokenizer's text before the token's first
    character. A token that starts inside a character split across byte tokens gets that character's index
    (the complete characters of the bytes still held back are counted; needs `names` to know the bytes)."""

    def __init__(self, tokenizer: object, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 names: TokenNames | None = None) -> None:
        self._tok = tokenizer
        self._backend = backend(tokenizer)
        self._skip = skip_special_tokens
        self._names = names
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._chars = 0  # characters returned so far
        self._pending = b""  # bytes of the tokens held back since the last returned text
        context = list(prompt_ids[-_CONTEXT:])
        while context and self._decode(context).endswith("\ufffd"):  # a stream cannot start mid-character
            context.pop()
        if self._backend is not None:
            self._stream = DecodeStream(context or None, skip_special_tokens=skip_special_tokens)
        else:
            self._ids = context
            self._prefix = 0
            self._read = len(context)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tok.decode(ids, skip_special_tokens=self._skip)  # type: ignore[attr-defined]

    def step(self, token_id: int) -> tuple[str, int]:
        """(the text this token completes, "" while a character is incomplete; the token's offset)."""
        offset = self._chars + len(self._pending.decode("utf-8", errors="ignore"))
        piece = self._next(token_id)
        if piece:
            self._chars += len(piece)
            self._pending = b""
        elif self._names is not None and token_id not in self._special:
            self._pending += self._names.token_bytes(token_id) or b""
        return piece, offset

    def _next(self, token_id: int) -> str:
        if self._backend is not None:
            return self._stream.step(self._backend, token_id) or ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""


def decode_with_offsets(tokenizer: object, ids: Sequence[int], names: TokenNames | None = None
                        ) -> tuple[str, list[int]]:
    """(text, offsets): offsets[i] = characters of `text` before token i's first character (see
    `IncrementalDetokenizer.step`)."""
    det = IncrementalDetokenizer(tokenizer, names=names or TokenNames(tokenizer))
    parts: list[str] = []
    offsets: list[int] = []
    for t in ids:
        piece, offset = det.step(t)
        parts.append(piece)
        offsets.append(offset)
    return "".join(parts), offsets


class StopStrings:
    """Stop strings over growing text, searching only where a new match can be: the new text plus the
    len(longest stop) - 1 characters before it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._longest = max(map(len, self.stops), default=0)

    def find(self, text: str, new_from: int) -> int | None:
        """Index in `text` where the first stop string starts, if one ends at or after `new_from`."""
        if not self.stops:
            return None
        start = max(0, new_from - self._longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def held(self, text: str) -> int:
        """How many trailing characters of `text` could start a stop string (held back from streaming)."""
        for k in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table (the ByteLevel pre-tokenizer's byte alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class TokenNames:
    """Display strings for token ids in logprobs (cached per id)."""

    def __init__(self, tokenizer: object) -> None:
        self._tok = tokenizer
        bt = backend(tokenizer)
        self._byte_level = bt is not None and isinstance(bt.decoder, ByteLevel)
        self._cache: dict[int, str] = {}

    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes a token stands for, when the tokenizer's scheme tells them (byte-level BPE, or
        SentencePiece byte fallback `<0xNN>`); None otherwise, and for a tokenizer without transformers'
        `convert_ids_to_tokens` (such a tokenizer's pieces carry no byte information)."""
        convert = getattr(self._tok, "convert_ids_to_tokens", None)
        if convert is None:
            return None
        piece = convert(token_id)
        if not isinstance(piece, str):
            return None
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return None
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                return None
        return None

    def name(self, token_id: int) -> str:
        if token_id in self._cache:
            return self._cache[token_id]
        text = self._tok.decode([token_id], skip_special_tokens=False)  # type: ignore[attr-defined]
        if "\ufffd" in text and hasattr(self._tok, "convert_ids_to_tokens"):
            raw = self.token_bytes(token_id)
            if raw is not None:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        self._cache[token_id] = text
        return text

    def names(self, ids: Sequence[int]) -> list[str]:
        """Names for one `top_logprobs` entry: distinct ids always get distinct names."""
        out: list[str] = []
        seen: dict[str, int] = {}
        for t in ids:
            s = self.name(t)
            if seen.get(s, t) != t:
                s = f"token_id:{t}"
            seen[s] = t
            out.append(s)
        return out

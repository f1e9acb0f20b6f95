"""Per-token logprobs in OpenAI's two shapes: the legacy completions object and chat's `logprobs.content` list."""

import re
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte -> the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte fallback pieces


class TokenTexts:
    """A token id's bytes and text as OpenAI shows them; cached, since the same ids come back all the time."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes). A token that holds part of a character shows as "bytes:\\xe2\\x80" (as OpenAI)."""
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._cache[token_id] = (text, list(raw))
        return hit

    def _bytes(self, token_id: int) -> bytes:
        if self.tokenizer is None:
            return f"token_id:{token_id}".encode()
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        # Part of a character: decoding alone gives U+FFFD, so read the token's bytes from its piece.
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            m = _BYTE_TOKEN.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            table = _byte_decoder()
            if piece and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return text.encode("utf-8")


def _top(entries: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k best of a token's entries (it holds the sampled token and the top k, so k or k + 1 entries)."""
    return sorted(entries.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], k: int, texts: TokenTexts,
                        offset: int) -> dict[str, Any]:
    """The legacy completions object for these tokens; `offset`: where the first token starts in the text."""
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for tid, entries in zip(token_ids, logprobs):
        text = texts(tid)[0]
        tokens.append(text)
        token_logprobs.append(entries.get(tid))
        top.append({texts(t)[0]: v for t, v in [(tid, entries.get(tid)), *_top(entries, k)] if v is not None})
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset}


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], k: int, texts: TokenTexts
                  ) -> dict[str, Any]:
    """Chat's `logprobs` object: one entry per token with its text, logprob, bytes and the k best alternatives."""

    def entry(tid: int, value: float | None) -> dict[str, Any]:
        text, raw = texts(tid)
        return {"token": text, "logprob": value, "bytes": raw}

    content = [{**entry(tid, entries.get(tid)), "top_logprobs": [entry(t, v) for t, v in _top(entries, k)]}
               for tid, entries in zip(token_ids, logprobs)]
    return {"content": content, "refusal": None}


def text_length(token_ids: list[int], texts: TokenTexts) -> int:
    """Characters the tokens take in completion_logprobs' offsets (where the next chunk's tokens start)."""
    return sum(len(texts(t)[0]) for t in token_ids)

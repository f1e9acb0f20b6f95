"""Turns output token ids into text and finds stop strings, without touching the device.

The one place that decides what text a request shows: the engine checks stop strings on the last few tokens
only (no re-decoding of the whole output per token), fills `req.text` when a request ends, and streams ask
`stream_text` for the text so far, which holds back an ending that may still become a stop string.
"""

from typing import Any

from .request import Request

# Tokens decoded beyond a stop string's length: a character can take several byte-level tokens.
_SLACK_TOKENS = 8


class Detokenizer:
    """Decodes a request's output; stop strings are looked for in the text the newest token completed."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def update(self, req: Request) -> str | None:
        """Return the stop string the newest token completed, and cut `req.text` there; None if there is none.

        Only a window of the last tokens is decoded: a stop string completed now ends in it, and one that ended
        earlier would have stopped the request then.
        """
        stops = req.params.stop
        if not stops or self.tokenizer is None:
            return None
        skip = req.params.skip_special_tokens
        window = max(len(s) for s in stops) + _SLACK_TOKENS
        tail = self.decode(req.output_token_ids[-window:], skip)
        if not any(s in tail for s in stops):
            return None
        # A hit: place it exactly in the whole text (decoded once, now).
        full = self.decode(req.output_token_ids, skip)
        start = max(0, len(full) - len(tail) - max(len(s) for s in stops))
        found = [(pos, s) for s in stops if (pos := full.find(s, start)) != -1]
        if not found:  # the window decoded differently from the whole text (a character split at its start)
            return None
        pos, s = min(found)
        req.text = full[: pos + len(s)] if req.params.include_stop_str_in_output else full[:pos]
        return s

    def stream_text(self, req: Request) -> str:
        """The text a stream may show now: the final text once the request ended, else the output so far minus
        an ending that could still grow into a stop string (it would have to be taken back)."""
        if req.is_finished:
            return req.text
        text = self.decode(req.output_token_ids, req.params.skip_special_tokens)
        return text[: len(text) - _pending_stop_prefix(text, req.params.stop)] if req.params.stop else text


def _pending_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest ending of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best

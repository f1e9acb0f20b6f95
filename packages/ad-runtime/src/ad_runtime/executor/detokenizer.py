"""Turns output token ids into text and finds stop strings, without touching the device."""

from typing import Any

from .request import Request


class Detokenizer:
    """Decodes a request's output; with stop strings, checks only the text that is new this step."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def update(self, req: Request) -> str | None:
        """Refresh `req.text`; return the stop string found in the newly added text, if any."""
        old_len = len(req.text)
        req.text = self.decode(req.output_token_ids, req.params.skip_special_tokens)
        stops = req.params.stop or []
        if not stops:
            return None
        # A stop string may straddle the previous text's end: start looking a little before it.
        window = max(len(s) for s in stops)
        start = max(0, old_len - window)
        best: tuple[int, str] | None = None
        for s in stops:
            pos = req.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        pos, s = best
        req.text = req.text[: pos + len(s)] if req.params.include_stop_str_in_output else req.text[:pos]
        return s

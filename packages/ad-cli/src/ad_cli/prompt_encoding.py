"""Requests' prompts to token ids and back for the HTTP routes, checked against the model's vocabulary and lengths."""

from collections.abc import Callable
from typing import Any

from .http_limits import one_line
from .openai_protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, bad_field

# Turns a parsed request into its prompt's token ids and text (None for a token-id prompt).
Encoder = Callable[[Any], tuple[list[int], str | None]]


def llm_arg(llm: Any, name: str) -> Any:
    """A field of the LLM's arguments, None when it has none (test doubles, older builds)."""
    return getattr(getattr(llm, "args", None), name, None)


class PromptEncoder:
    """Encodes and decodes with the LLM's tokenizer (or chat template); every method runs in a worker thread."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.max_seq_len = llm_arg(llm, "max_seq_len")
        self.max_input_len = llm_arg(llm, "max_input_len") or self.max_seq_len
        try:
            self.vocab = int(llm.vocab_size)
        except Exception:  # noqa: BLE001 - a backend that does not say: the engine checks ids itself
            self.vocab = 0

    def check_vocab(self, ids: Any, param: str) -> None:
        """BadRequest blaming `param` for the first id the vocabulary lacks (none when its size is unknown)."""
        bad = next((t for t in ids if t >= self.vocab), None) if self.vocab else None
        if bad is not None:
            raise bad_field(param, f"token id {bad} is outside the vocabulary (size {self.vocab})")

    def checked(self, encode: Encoder, req: Any) -> tuple[list[int], str | None]:
        """The request's token ids (and text), checked against the vocabulary and the server's lengths."""
        ids, text = encode(req)
        if not ids:
            raise bad_field("prompt", "the prompt is empty")
        self.check_vocab(ids, "prompt")
        # Checked here, not only by the engine: a stream's 200 is sent before the engine sees the request.
        max_seq_len, max_input_len = self.max_seq_len, self.max_input_len
        if max_seq_len and len(ids) >= max_seq_len:
            raise bad_field("prompt", f"the prompt has {len(ids)} tokens, max_seq_len is {max_seq_len}")
        if max_input_len and len(ids) > max_input_len:
            raise bad_field("prompt", f"the prompt has {len(ids)} tokens, max_input_len is {max_input_len}")
        return ids, text

    def encode_completion(self, req: CompletionRequest) -> tuple[list[int], str | None]:
        if req.echo:
            req._echo_text = req.prompt if isinstance(req.prompt, str) else self.decode(list(req.prompt), "echo")
        return self._encode_text(req.prompt) if isinstance(req.prompt, str) else (list(req.prompt), None)

    def _encode_text(self, prompt: str) -> tuple[list[int], str | None]:
        try:
            return self.llm.encode(prompt)
        except ValueError as e:  # no tokenizer for a text prompt, text it cannot take
            raise bad_field("prompt", str(e)) from None

    def encode_chat(self, req: ChatRequest | TokenizeRequest) -> tuple[list[int], str | None]:
        try:
            return self.llm.encode([m.model_dump() for m in req.messages or ()])
        except Exception as e:  # noqa: BLE001 - the chat template refuses the conversation (roles, order)
            raise bad_field("messages", one_line(str(e)) or type(e).__name__) from None

    def _tokenizer(self, param: str, purpose: str = "") -> Any:
        tokenizer = getattr(self.llm, "tokenizer", None)
        if tokenizer is None:
            raise bad_field(param, f"the server has no tokenizer{purpose}")
        return tokenizer

    def decode(self, ids: list[int], param: str) -> str:
        """The text of token ids, special tokens included."""
        return self._tokenizer(param, " to turn token ids into text").decode(ids)

    def token_ids(self, req: TokenizeRequest) -> list[int]:
        """A text as /v1/completions tokenises it, or messages as chat does, unless add_special_tokens is given."""
        if req.messages is not None:
            ids, text = self.encode_chat(req)
            if not req.add_special_tokens:
                return ids
            prompt = text
        elif req.add_special_tokens is None:
            return self._encode_text(req.prompt)[0]
        else:
            prompt = req.prompt
        return self._tokenizer("add_special_tokens").encode(prompt, add_special_tokens=req.add_special_tokens)

    def detokenize(self, req: DetokenizeRequest) -> str:
        self.check_vocab(req.tokens, "tokens")
        return self.decode(req.tokens, "tokens")

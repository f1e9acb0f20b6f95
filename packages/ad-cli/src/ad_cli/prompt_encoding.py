"""Requests' prompts to token ids and back for the HTTP routes, checked against the model's vocabulary and lengths."""

from collections.abc import Callable
from typing import Any

from .http_limits import one_line
from .openai_protocol import BadRequest, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

# Turns a parsed request into its prompt's token ids and text (None for a token-id prompt).
Encoder = Callable[[Any], tuple[list[int], str | None]]


def llm_arg(llm: Any, name: str) -> Any:
    """A field of the LLM's arguments, None when it has none (test doubles, older builds)."""
    return getattr(getattr(llm, "args", None), name, None)


def messages_of(req: ChatRequest | TokenizeRequest) -> list[dict[str, str]]:
    return [m.model_dump() for m in req.messages or ()]


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

    def outside_vocab(self, ids: Any) -> int | None:
        """The first id the vocabulary lacks; None when all are in it, or the vocabulary size is unknown."""
        return next((t for t in ids if t >= self.vocab), None) if self.vocab else None

    def checked(self, encode: Encoder, req: Any) -> tuple[list[int], str | None]:
        """The request's token ids (and text), checked against the vocabulary and the server's lengths."""
        ids, text = encode(req)
        if not ids:
            raise BadRequest(400, "prompt: the prompt is empty", "prompt")
        bad = self.outside_vocab(ids)
        if bad is not None:
            raise BadRequest(400, f"prompt: token id {bad} is outside the vocabulary (size {self.vocab})", "prompt")
        # Checked here, not only by the engine: a stream's 200 is sent before the engine sees the request.
        max_seq_len, max_input_len = self.max_seq_len, self.max_input_len
        if max_seq_len and len(ids) >= max_seq_len:
            raise BadRequest(400, f"prompt: the prompt has {len(ids)} tokens, max_seq_len is {max_seq_len}", "prompt")
        if max_input_len and len(ids) > max_input_len:
            raise BadRequest(400, f"prompt: the prompt has {len(ids)} tokens, max_input_len is {max_input_len}",
                             "prompt")
        return ids, text

    def encode_completion(self, req: CompletionRequest) -> tuple[list[int], str | None]:
        if req.echo:
            req._echo_text = req.prompt if isinstance(req.prompt, str) else self.decode(list(req.prompt), "echo")
        if not isinstance(req.prompt, str):
            return list(req.prompt), None
        try:
            return self.llm.encode(req.prompt)
        except ValueError as e:  # no tokenizer for a text prompt, text it cannot take
            raise BadRequest(400, f"prompt: {e}", "prompt") from None

    def encode_chat(self, req: ChatRequest) -> tuple[list[int], str | None]:
        try:
            return self.llm.encode(messages_of(req))
        except Exception as e:  # noqa: BLE001 - the chat template refuses the conversation (roles, order)
            raise BadRequest(400, f"messages: {one_line(str(e)) or type(e).__name__}", "messages") from None

    def decode(self, ids: list[int], param: str) -> str:
        """The text of token ids, special tokens included."""
        tokenizer = getattr(self.llm, "tokenizer", None)
        if tokenizer is None:
            raise BadRequest(400, f"{param}: the server has no tokenizer to turn token ids into text", param)
        return tokenizer.decode(ids)

    def token_ids(self, req: TokenizeRequest) -> list[int]:
        """A text as /v1/completions tokenises it, or messages as chat does, unless add_special_tokens is given."""
        if req.messages is not None:
            ids, text = self.encode_chat(req)  # type: ignore[arg-type] - reads only .messages
            if not req.add_special_tokens:
                return ids
            prompt = text
        elif req.add_special_tokens is None:
            try:
                return self.llm.encode(req.prompt)[0]
            except ValueError as e:  # no tokenizer, text it cannot take
                raise BadRequest(400, f"prompt: {e}", "prompt") from None
        else:
            prompt = req.prompt
        tokenizer = getattr(self.llm, "tokenizer", None)
        if tokenizer is None:
            raise BadRequest(400, "add_special_tokens: the server has no tokenizer", "add_special_tokens")
        return tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens)

    def detokenize(self, req: DetokenizeRequest) -> str:
        bad = self.outside_vocab(req.tokens)
        if bad is not None:
            raise BadRequest(400, f"tokens: token id {bad} is outside the vocabulary (size {self.vocab})", "tokens")
        return self.decode(req.tokens, "tokens")

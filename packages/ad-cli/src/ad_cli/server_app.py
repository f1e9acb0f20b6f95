"""An OpenAI-compatible HTTP API (completions, chat completions, models, tokenize, metrics) over one shared engine."""

import asyncio
import importlib.metadata
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .distributed_engine import DistributedEngine
from .engine_thread import EngineThread, Update
from .http_auth import ApiKeyMiddleware
from .http_limits import BodyLimitMiddleware, EventTally, ServerLimits, one_line
from .logprobs_format import TokenTexts, chat_logprobs, completion_logprobs, text_length
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ServerMetrics
from .openai_protocol import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestBody,
    SamplingRequest,
    TokenizeRequest,
    first_error,
    parse_request,
)

logger = logging.getLogger("ad_cli.http")

# How often a non-streaming request checks whether its client is still there (to abort it if not).
DISCONNECT_POLL_S = 1.0
# Turns a parsed request into its prompt's token ids and text (None for a token-id prompt).
Encoder = Callable[[Any], tuple[list[int], str | None]]


def _error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body, so OpenAI clients show the message; always one line."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": one_line(message), "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    return first_error(list(exc.errors()))


def _version() -> str:
    try:
        return importlib.metadata.version("ad-cli")
    except importlib.metadata.PackageNotFoundError:  # run from PYTHONPATH, not installed
        return "unknown"


def start_engine(llm: Any, metrics: ServerMetrics | None = None) -> EngineThread | DistributedEngine:
    """A local engine on a background thread; with world_size > 1 the engine lives in rank 0's process."""
    if llm.engine is not None:
        return EngineThread(llm, metrics)
    return DistributedEngine(llm.backend, metrics)


async def _last_update(q: asyncio.Queue, engine: Any, http: Request) -> Update | None:
    """The request's final Update; None (and the request aborted) when its client went away first."""
    while True:
        try:
            upd = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await http.is_disconnected():
                engine.abort(q)
                return None
            continue
        if upd.finished:
            return upd


async def _merged(qs: list[asyncio.Queue]) -> AsyncIterator[tuple[int, Update]]:
    """(choice index, update) from several requests' queues as they arrive, until each has sent its last."""
    if len(qs) == 1:  # the common case, without a task per update
        while True:
            upd = await qs[0].get()
            yield 0, upd
            if upd.finished:
                return
    waiting = {asyncio.ensure_future(q.get()): i for i, q in enumerate(qs)}
    try:
        while waiting:
            ready, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(ready, key=waiting.__getitem__):
                i = waiting.pop(fut)
                upd = fut.result()
                yield i, upd
                if not upd.finished:
                    waiting[asyncio.ensure_future(qs[i].get())] = i
    finally:
        for fut in waiting:  # a cancelled get takes nothing from its queue
            fut.cancel()


@dataclass
class _Shown:
    """What one choice of a stream has sent so far."""

    text: str = ""
    tokens: int = 0  # tokens whose logprobs were sent
    offset: int = 0  # where the next token starts in the text (completions' text_offset)
    role: bool = False  # a chat choice names its role in its first chunk


class _Stream(StreamingResponse):
    """A streaming response that runs `on_close` however it ends (finished, cancelled, never started)."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _arg(llm: Any, name: str) -> Any:
    """A field of the LLM's arguments, None when it has none (test doubles, older builds)."""
    return getattr(getattr(llm, "args", None), name, None)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    # cached_tokens: prompt tokens the prefix cache supplied (the n choices of a request share one prompt).
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def build_app(llm: Any, model_name: str, default_max_tokens: int = 256, limits: ServerLimits | None = None,
              api_key: str | None = None) -> FastAPI:
    """The app over `llm`; its engine runs on one background thread (or on rank 0) while the app is up.

    With `api_key`, every route but /health, /version and /metrics asks for `Authorization: Bearer <api_key>`.
    """
    limits = limits or ServerLimits()
    state: dict[str, Any] = {"in_flight": 0, "preparing": 0}
    max_batch = _arg(llm, "max_batch_size") or 0
    max_seq_len = _arg(llm, "max_seq_len")
    max_input_len = _arg(llm, "max_input_len") or max_seq_len
    try:
        vocab = int(llm.vocab_size)
    except Exception:  # noqa: BLE001 - a backend that does not say: the engine checks ids itself
        vocab = 0
    tally = EventTally(logger)
    token_texts = TokenTexts(getattr(llm, "tokenizer", None))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Tokenisation runs in worker threads, one at a time: fast tokenizers are not safe to share between
        # threads ("Already borrowed"), and one at a time is all two CPU cores give anyway.
        state["tokenizer_lock"] = anyio.CapacityLimiter(1)
        state["engine"] = start_engine(llm, metrics)
        try:
            yield
        finally:
            state["engine"].close()

    app = FastAPI(title="ad inference server", lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=limits.max_body_bytes, body_timeout=limits.body_timeout)
    if api_key is not None:  # added last, so it runs first: a refused request's body is never read
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    # OpenAI answers every malformed request with 400 and an `error` object; do the same.
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(BadRequest)
    async def _bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, {"retry-after": "1"} if exc.status == 503 else None)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        # One line, no traceback or paths: those go to the log (rate-limited), not to clients.
        return _error(500, f"internal server error ({type(exc).__name__})")

    def engine_problem() -> str | None:
        """Why the engine cannot serve now, or None."""
        engine = state.get("engine")
        if engine is None:
            return "the engine is not running"
        check = getattr(engine, "health", None)
        if check is None:
            return None
        try:
            reason = check()
        except Exception as e:  # noqa: BLE001 - a failing health check is itself the answer
            reason = f"the engine's health check failed ({type(e).__name__})"
        return one_line(reason) if reason else None

    def num_waiting() -> int:
        """Requests admitted but not running: preparing here, plus those waiting in the engine."""
        engine = state["engine"]
        try:
            waiting = int(engine.num_waiting)
        except Exception:  # noqa: BLE001 - engines without the count: estimate from what is in flight
            waiting = max(0, state["in_flight"] - max_batch)
        return waiting + state["preparing"]

    def num_running() -> int:
        running = getattr(state.get("engine"), "num_running", None)
        if running is None:  # rank 0's engine is in another process: what is in flight and not waiting
            return max(0, state["in_flight"] - max(0, num_waiting() - state["preparing"]))
        return int(running)

    def kv_cache_usage() -> float:
        return float(getattr(state.get("engine"), "kv_cache_usage", 0.0))

    # Engine internals (running, KV-cache use) are visible only with the engine in this process (EngineThread).
    metrics = ServerMetrics(model_name, num_running, lambda: num_waiting() if "engine" in state else 0,
                            kv_cache_usage if getattr(llm, "engine", None) is not None else None)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/health")
    async def health() -> Any:
        reason = engine_problem()
        if reason:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "ad"}]}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": _version()}

    async def admit(http: Request, model: type[SamplingRequest], encode: Encoder):
        """Check the server can take a request, then parse, validate and tokenise it, all off the event loop."""
        reason = engine_problem()
        if reason:
            raise BadRequest(503, f"the server cannot serve requests: {reason}")
        if num_waiting() >= limits.max_queued_requests:
            tally.note("503 queue full")
            raise BadRequest(503, f"the server has {limits.max_queued_requests} requests waiting; try again")
        state["preparing"] += 1
        try:
            body = await http.body()  # already read (and size-checked) by BodyLimitMiddleware
            req = await anyio.to_thread.run_sync(parse_request, body, model)
            limit = req.max_new_tokens
            if max_seq_len and limit is not None and limit > max_seq_len:
                raise BadRequest(400, f"{req.max_tokens_param}: {limit} is more than the server's max_seq_len "
                                      f"({max_seq_len})", req.max_tokens_param)
            bad = next((t for t in req.bias if t >= vocab), None) if vocab else None
            if bad is not None:
                raise BadRequest(400, f"logit_bias: token id {bad} is outside the vocabulary (size {vocab})",
                                 "logit_bias")
            ids, text = await anyio.to_thread.run_sync(tokenize, encode, req, limiter=state["tokenizer_lock"])
        finally:
            state["preparing"] -= 1
        return req, ids, text

    def tokenize(encode: Encoder, req: Any) -> tuple[list[int], str | None]:
        """The request's token ids (and text), checked against the vocabulary; in a worker thread."""
        ids, text = encode(req)
        if not ids:
            raise BadRequest(400, "prompt: the prompt is empty", "prompt")
        if vocab:
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise BadRequest(400, f"prompt: token id {bad} is outside the vocabulary (size {vocab})", "prompt")
        # Checked here, not only by the engine: a stream's 200 is sent before the engine sees the request.
        if max_seq_len and len(ids) >= max_seq_len:
            raise BadRequest(400, f"prompt: the prompt has {len(ids)} tokens, max_seq_len is {max_seq_len}", "prompt")
        if max_input_len and len(ids) > max_input_len:
            raise BadRequest(400, f"prompt: the prompt has {len(ids)} tokens, max_input_len is {max_input_len}",
                             "prompt")
        return ids, text

    async def _run(ids: list[int], text: str | None, req: SamplingRequest, chat: bool, http: Request):
        echo = req._echo_text if isinstance(req, CompletionRequest) and req.echo else ""
        try:
            params = req.params(default_max_tokens)
        except ValueError as e:
            raise BadRequest(400, str(e)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        engine = state["engine"]
        # n choices are n requests of the engine, each with its own random stream (SamplingParams.for_choices).
        qs = [engine.submit(ids, p, text, stream=bool(req.stream)) for p in params.for_choices()]
        state["in_flight"] += len(qs)
        done = [False] * len(qs)

        def release(i: int) -> None:
            if not done[i]:
                done[i] = True
                state["in_flight"] -= 1

        def close() -> None:
            for i, q in enumerate(qs):
                if not done[i]:  # the client went away before the last update: stop the request
                    engine.abort(q)
                release(i)

        k = params.logprobs
        if req.stream:
            chunks = _stream(qs, rid, created, chat, release, echo, len(ids) if req.include_usage else None, k)
            return _Stream(chunks, close, media_type="text/event-stream")
        upds = []
        try:
            for i, q in enumerate(qs):
                upd = await _last_update(q, engine, http)
                release(i)
                if upd is None:
                    return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
                if upd.error:
                    raise BadRequest(500 if upd.internal else 400, upd.error)
                upds.append(upd)
        finally:
            close()
        usage = _usage(len(ids), sum(len(u.token_ids) for u in upds), max(u.num_cached_tokens for u in upds))
        choices = []
        for i, upd in enumerate(upds):
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": upd.text}}
            else:
                choice = {"index": i, "text": echo + upd.text}
            if k is not None:
                choice["logprobs"] = _logprobs_of(upd.token_ids, upd.logprobs or [], k, chat, 0)
            choices.append({**choice, "finish_reason": upd.finish_reason})
        obj = "chat.completion" if chat else "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name,
                             "choices": choices, "usage": usage})

    def _logprobs_of(token_ids: list[int], logprobs: list[dict[int, float]], k: int, chat: bool,
                     offset: int) -> dict[str, Any]:
        if chat:
            return chat_logprobs(token_ids, logprobs, k, token_texts)
        return completion_logprobs(token_ids, logprobs, k, token_texts, offset)

    async def _stream(qs: list[asyncio.Queue], rid: str, created: int, chat: bool, release: Callable[[int], None],
                      echo: str, prompt_tokens: int | None, k: int | None):
        """The request's chunks as server-sent events, each tagged with its choice's index; with `prompt_tokens`
        (include_usage) a last chunk with the usage of all choices and no choices, as OpenAI sends it. With
        logprobs (`k`), a chunk carries those of the tokens that arrived since the choice's previous chunk."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": model_name}
        if prompt_tokens is not None:
            head["usage"] = None  # OpenAI: null in every chunk but the last
        if echo:
            for i in range(len(qs)):
                choice = {"index": i, "text": echo, "finish_reason": None}
                yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        shown = [_Shown() for _ in qs]
        completion_tokens = cached_tokens = 0
        failed = False
        async with aclosing(_merged(qs)) as updates:  # closed at once on an error: its pending gets are cancelled
            async for i, upd in updates:
                if upd.finished:
                    release(i)
                    completion_tokens += len(upd.token_ids)
                    cached_tokens = max(cached_tokens, upd.num_cached_tokens)
                if upd.error:
                    yield f"data: {json.dumps({'error': {'message': one_line(upd.error)}})}\n\n"
                    failed = True
                    break
                choice = next_choice(i, shown[i], upd, chat, k)
                if choice is not None:
                    yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        if prompt_tokens is not None and not failed:
            usage = _usage(prompt_tokens, completion_tokens, cached_tokens)
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    def next_choice(i: int, shown: "_Shown", upd: Update, chat: bool, k: int | None) -> dict[str, Any] | None:
        """Choice i's part of the next chunk: what `upd` adds to what it has shown; None when nothing."""
        # Hold back a trailing replacement char: the next token may complete the character.
        text = upd.text if upd.finished else upd.text.rstrip("\ufffd")
        delta = text[len(shown.text):]
        if text.startswith(shown.text):
            shown.text = text
        if not delta and not upd.finished:
            return None
        if chat:
            role = {} if shown.role else {"role": "assistant"}
            choice = {"index": i, "delta": {**role, "content": delta}}
            shown.role = True
        else:
            choice = {"index": i, "text": delta}
        if k is not None:  # the logprobs of the tokens that arrived since the choice's previous chunk
            new = upd.token_ids[shown.tokens:]
            choice["logprobs"] = _logprobs_of(new, (upd.logprobs or [])[shown.tokens:], k, chat, shown.offset)
            shown.tokens = len(upd.token_ids)
            shown.offset += text_length(new, token_texts)
        return {**choice, "finish_reason": upd.finish_reason}

    def encode_completion(req: CompletionRequest) -> tuple[list[int], str | None]:
        if req.echo:
            req._echo_text = req.prompt if isinstance(req.prompt, str) else decode(list(req.prompt), "echo")
        if not isinstance(req.prompt, str):
            return list(req.prompt), None
        try:
            return llm.encode(req.prompt)
        except ValueError as e:  # no tokenizer for a text prompt, text it cannot take
            raise BadRequest(400, f"prompt: {e}", "prompt") from None

    def decode(ids: list[int], param: str) -> str:
        """The text of token ids, special tokens included; in a worker thread."""
        tokenizer = getattr(llm, "tokenizer", None)
        if tokenizer is None:
            raise BadRequest(400, f"{param}: the server has no tokenizer to turn token ids into text", param)
        return tokenizer.decode(ids)

    def messages_of(req: ChatRequest | TokenizeRequest) -> list[dict[str, str]]:
        return [m.model_dump() for m in req.messages or ()]

    def encode_chat(req: ChatRequest) -> tuple[list[int], str | None]:
        try:
            return llm.encode(messages_of(req))
        except Exception as e:  # noqa: BLE001 - the chat template refuses the conversation (roles, order)
            raise BadRequest(400, f"messages: {one_line(str(e)) or type(e).__name__}", "messages") from None

    @app.post("/v1/completions")
    async def completions(http: Request):
        req, ids, text = await admit(http, CompletionRequest, encode_completion)
        return await _run(ids, text, req, chat=False, http=http)

    @app.post("/v1/chat/completions")
    async def chat(http: Request):
        req, ids, text = await admit(http, ChatRequest, encode_chat)
        return await _run(ids, text, req, chat=True, http=http)

    async def parse_and(http: Request, model: type[RequestBody], work: Callable[[Any], Any]) -> Any:
        """Parse a request and run `work` on it, both off the event loop (`work` holding the tokenizer)."""
        req = await anyio.to_thread.run_sync(parse_request, await http.body(), model)
        return await anyio.to_thread.run_sync(work, req, limiter=state["tokenizer_lock"])

    def token_ids(req: TokenizeRequest) -> list[int]:
        """A text as /v1/completions tokenises it, or messages as chat does, unless add_special_tokens is given."""
        if req.messages is not None:
            ids, text = encode_chat(req)  # type: ignore[arg-type] - reads only .messages
            if not req.add_special_tokens:
                return ids
            prompt = text
        elif req.add_special_tokens is None:
            try:
                return llm.encode(req.prompt)[0]
            except ValueError as e:  # no tokenizer, text it cannot take
                raise BadRequest(400, f"prompt: {e}", "prompt") from None
        else:
            prompt = req.prompt
        tokenizer = getattr(llm, "tokenizer", None)
        if tokenizer is None:
            raise BadRequest(400, "add_special_tokens: the server has no tokenizer", "add_special_tokens")
        return tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens)

    @app.post("/tokenize")
    async def tokenize_route(http: Request) -> dict[str, Any]:
        ids = await parse_and(http, TokenizeRequest, token_ids)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_seq_len}

    def detokenize(req: DetokenizeRequest) -> str:
        bad = next((t for t in req.tokens if t >= vocab), None) if vocab else None
        if bad is not None:
            raise BadRequest(400, f"tokens: token id {bad} is outside the vocabulary (size {vocab})", "tokens")
        return decode(req.tokens, "tokens")

    @app.post("/detokenize")
    async def detokenize_route(http: Request) -> dict[str, str]:
        return {"prompt": await parse_and(http, DetokenizeRequest, detokenize)}

    return app

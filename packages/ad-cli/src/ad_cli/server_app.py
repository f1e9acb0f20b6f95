"""An OpenAI-compatible HTTP API (completions, chat completions, models) over one shared engine."""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import anyio.to_thread
from ad_runtime import SamplingParams
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .distributed_engine import DistributedEngine
from .engine_thread import EngineThread, Update
from .http_limits import BodyLimitMiddleware, EventTally, ServerLimits, one_line

logger = logging.getLogger("ad_cli.http")

# How often a non-streaming request checks whether its client is still there (to abort it if not).
DISCONNECT_POLL_S = 1.0
# Mirrors ad_runtime.sampling_params (checked here too, so the error names the request's field).
MAX_SEED = 2**64 - 1
MAX_COUNT = 2**31 - 1


def _valid_text(text: str) -> str:
    """Text must encode as UTF-8: a lone surrogate ("\\ud800", legal in JSON) breaks the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text ({e.reason} at position {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_valid_text)]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    temperature: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: list[Annotated[Text, Field(min_length=1)]] | None = None
    stream: bool = False
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def params(self, default_max: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens or default_max, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Sampling):
    # Checked by hand, not as a union: pydantic would name both union members in its error.
    prompt: Any

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, str):
            return _valid_text(v)
        if isinstance(v, list) and v and all(type(t) is int and 0 <= t <= MAX_COUNT for t in v):
            return v
        raise ValueError("must be a string or a non-empty list of token ids (ints >= 0)")


class ChatMessage(BaseModel):
    role: Text
    content: Text


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class BadRequest(Exception):
    """A request the server refuses before it reaches the engine: status, message and the field to blame."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body, so OpenAI clients show the message; always one line."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": one_line(message), "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _first_error(errors: list[Any]) -> tuple[str, str | None]:
    """The first problem as `field: reason` (clients show one line best)."""
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    return _first_error(list(exc.errors()))


def parse_request(body: bytes, model: type[BaseModel]) -> Any:
    """The request from its JSON body, validated; BadRequest naming the field otherwise. Runs off the loop."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise BadRequest(400, "the request body nests too deeply") from None
    except ValueError as e:  # bad JSON, bad UTF-8, an integer of thousands of digits
        raise BadRequest(400, f"the request body is not valid JSON: {one_line(str(e))}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(400, *_first_error(e.errors(include_url=False))) from None


def start_engine(llm: Any) -> EngineThread | DistributedEngine:
    """A local engine on a background thread; with world_size > 1 the engine lives in rank 0's process."""
    if llm.engine is not None:
        return EngineThread(llm)
    return DistributedEngine(llm.backend)


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


def build_app(llm: Any, model_name: str, default_max_tokens: int = 256, limits: ServerLimits | None = None) -> FastAPI:
    """The app over `llm`; its engine runs on one background thread (or on rank 0) while the app is up."""
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

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Tokenisation runs in worker threads, one at a time: fast tokenizers are not safe to share between
        # threads ("Already borrowed"), and one at a time is all two CPU cores give anyway.
        state["tokenizer_lock"] = anyio.CapacityLimiter(1)
        state["engine"] = start_engine(llm)
        try:
            yield
        finally:
            state["engine"].close()

    app = FastAPI(title="ad inference server", lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=limits.max_body_bytes, body_timeout=limits.body_timeout)

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

    @app.get("/health")
    async def health() -> Any:
        reason = engine_problem()
        if reason:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "ad"}]}

    async def admit(http: Request, model: type[BaseModel], encode: Callable[[Any], tuple[list[int], str | None]]):
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
            if max_seq_len and req.max_tokens is not None and req.max_tokens > max_seq_len:
                raise BadRequest(400, f"max_tokens: {req.max_tokens} is more than the server's max_seq_len "
                                      f"({max_seq_len})", "max_tokens")
            ids, text = await anyio.to_thread.run_sync(tokenize, encode, req, limiter=state["tokenizer_lock"])
        finally:
            state["preparing"] -= 1
        return req, ids, text

    def tokenize(encode: Callable[[Any], tuple[list[int], str | None]], req: Any) -> tuple[list[int], str | None]:
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

    async def _run(ids: list[int], text: str | None, req: _Sampling, chat: bool, http: Request):
        try:
            params = req.params(default_max_tokens)
        except ValueError as e:
            raise BadRequest(400, str(e)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        engine = state["engine"]
        q = engine.submit(ids, params, text, stream=req.stream)
        state["in_flight"] += 1
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                state["in_flight"] -= 1

        if req.stream:
            def close() -> None:
                if not done:  # the client went away before the last update: stop the request
                    engine.abort(q)
                release()

            return _Stream(_stream(q, rid, created, chat, release), close, media_type="text/event-stream")
        try:
            upd = await _last_update(q, engine, http)
        finally:
            release()
        if upd is None:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        if upd.error:
            raise BadRequest(500 if upd.internal else 400, upd.error)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(upd.token_ids),
                 "total_tokens": len(ids) + len(upd.token_ids)}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": upd.text},
                      "finish_reason": upd.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": upd.text, "finish_reason": upd.finish_reason}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name,
                             "choices": [choice], "usage": usage})

    async def _stream(q: asyncio.Queue, rid: str, created: int, chat: bool, release: Callable[[], None]):
        sent = ""
        obj = "chat.completion.chunk" if chat else "text_completion"
        while True:
            upd = await q.get()
            if upd.finished:
                release()
            if upd.error:
                yield f"data: {json.dumps({'error': {'message': one_line(upd.error)}})}\n\n"
                break
            # Hold back a trailing replacement char: the next token may complete the character.
            text = upd.text if upd.finished else upd.text.rstrip("\ufffd")
            delta, sent = text[len(sent):], text if text.startswith(sent) else sent
            if delta or upd.finished:
                if chat:
                    choice = {"index": 0, "delta": {"content": delta}, "finish_reason": upd.finish_reason}
                else:
                    choice = {"index": 0, "text": delta, "finish_reason": upd.finish_reason}
                chunk = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if upd.finished:
                break
        yield "data: [DONE]\n\n"

    def encode_completion(req: CompletionRequest) -> tuple[list[int], str | None]:
        if not isinstance(req.prompt, str):
            return list(req.prompt), None
        try:
            return llm.encode(req.prompt)
        except ValueError as e:  # no tokenizer for a text prompt, text it cannot take
            raise BadRequest(400, f"prompt: {e}", "prompt") from None

    def encode_chat(req: ChatRequest) -> tuple[list[int], str | None]:
        try:
            return llm.encode([m.model_dump() for m in req.messages])
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

    return app

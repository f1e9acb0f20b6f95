"""An OpenAI-compatible HTTP API (completions, chat completions, models) over one shared engine."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ad_runtime import SamplingParams
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .distributed_engine import DistributedEngine
from .engine_thread import EngineThread, Update

# How often a non-streaming request checks whether its client is still there (to abort it if not).
DISCONNECT_POLL_S = 1.0


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    ignore_eos: bool = False

    def params(self, default_max: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens or default_max, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage]


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error body, so OpenAI clients show the message."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem as `field: reason` (clients show one line best)."""
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    err = errs[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {err.get('msg', 'invalid')}" if param else str(err.get("msg", "invalid request"))), param


def start_engine(llm: Any) -> EngineThread | DistributedEngine:
    """A local engine on a background thread; with world_size > 1 the engine lives in rank 0's process."""
    if llm.engine is not None:
        return EngineThread(llm)
    return DistributedEngine(llm._backend)  # LLM has no public handle on its backend yet


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


def build_app(llm: Any, model_name: str, default_max_tokens: int = 256) -> FastAPI:
    """The app over `llm`; its engine runs on one background thread (or on rank 0) while the app is up."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["engine"] = start_engine(llm)
        try:
            yield
        finally:
            state["engine"].close()

    app = FastAPI(title="ad inference server", lifespan=lifespan)

    # OpenAI answers every malformed request with 400 and an `error` object; do the same.
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "ad"}]}

    async def _run(ids: list[int], text: str | None, req: _Sampling, chat: bool, http: Request):
        try:
            params = req.params(default_max_tokens)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        q = state["engine"].submit(ids, params, text, stream=req.stream)
        if req.stream:
            return StreamingResponse(_stream(q, rid, created, chat, len(ids)), media_type="text/event-stream")
        upd = await _last_update(q, state["engine"], http)
        if upd is None:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        if upd.error:
            raise HTTPException(status_code=500 if upd.internal else 400, detail=upd.error)
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

    async def _stream(q, rid: str, created: int, chat: bool, n_prompt: int):
        sent = ""
        obj = "chat.completion.chunk" if chat else "text_completion"
        finished = False
        try:
            while not finished:
                upd = await q.get()
                finished = upd.finished
                if upd.error:
                    yield f"data: {json.dumps({'error': {'message': upd.error}})}\n\n"
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
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away mid-stream (the response was cancelled or closed)
                state["engine"].abort(q)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        try:
            ids, text = llm.encode(req.prompt) if isinstance(req.prompt, str) else (list(req.prompt), None)
        except ValueError as e:  # no tokenizer for a text prompt
            raise HTTPException(status_code=400, detail=str(e)) from None
        return await _run(ids, text, req, chat=False, http=http)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, http: Request):
        try:
            ids, text = llm.encode([m.model_dump() for m in req.messages])
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        return await _run(ids, text, req, chat=True, http=http)

    return app

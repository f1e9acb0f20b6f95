"""An OpenAI-compatible HTTP API (completions, chat completions, models, tokenize, metrics) over one shared engine."""

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .distributed_engine import DistributedEngine
from .engine_thread import EngineThread, Update
from .http_auth import ApiKeyMiddleware
from .http_limits import BodyLimitMiddleware, ServerLimits, error_object, one_line
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ServerMetrics
from .openai_protocol import BadRequest, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, first_error
from .openai_serving import OpenAIHandlers

# How often a non-streaming request checks whether its client is still there (to abort it if not).
DISCONNECT_POLL_S = 1.0


def _error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body, so OpenAI clients show the message; always one line."""
    return JSONResponse(error_object(status, one_line(message), param), status_code=status, headers=headers)


def _version() -> str:
    try:
        return importlib.metadata.version("ad-cli")
    except importlib.metadata.PackageNotFoundError:  # run from PYTHONPATH, not installed
        return "unknown"


def start_engine(llm: Any, metrics: ServerMetrics | None = None) -> EngineThread | DistributedEngine:
    """A local engine on a background thread; with world_size > 1 or engine_process the engine lives in rank 0's
    process."""
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


def build_app(llm: Any, model_name: str, default_max_tokens: int = 256, limits: ServerLimits | None = None,
              api_key: str | None = None) -> FastAPI:
    """The app over `llm`; its engine runs on one background thread (or on rank 0) while the app is up.

    With `api_key`, every route but /health, /version and /metrics asks for `Authorization: Bearer <api_key>`.
    """
    limits = limits or ServerLimits()
    # _last_update lives here beside DISCONNECT_POLL_S, which it reads at each call (tests shorten it).
    handlers = OpenAIHandlers(llm, model_name, default_max_tokens, limits, _last_update)
    state = handlers.state
    # The engine's counts: read from it on its thread (EngineThread), or as rank 0 last sent them (DistributedEngine).
    metrics = ServerMetrics(model_name, handlers.num_running,
                            lambda: handlers.num_waiting() if "engine" in state else 0, handlers.kv_cache_usage)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Tokenisation runs in worker threads, one at a time: fast tokenizers are not safe to share between
        # threads ("Already borrowed"), and one at a time is all two CPU cores give anyway.
        state["tokenizer_lock"] = anyio.CapacityLimiter(1)
        state["engine"] = start_engine(llm, metrics)  # looked up at start: tests replace the engine here
        try:
            yield
        finally:
            state["engine"].close()

    app = FastAPI(title="ad inference server", lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=limits.max_body_bytes, body_timeout=limits.body_timeout)
    if api_key is not None:  # added last, so it runs first: a refused request's body is never read
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    _add_error_handlers(app)
    _add_info_routes(app, handlers, metrics, model_name)
    _add_request_routes(app, handlers)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """OpenAI answers every malformed request with 400 and an `error` object; do the same."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, *first_error(list(exc.errors())))

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


def _add_info_routes(app: FastAPI, handlers: OpenAIHandlers, metrics: ServerMetrics, model_name: str) -> None:
    """/metrics, /health, /v1/models and /version: what the server is and how it does, no engine request."""

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/health")
    async def health() -> Any:
        reason = handlers.engine_problem()
        if reason:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "ad"}]}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": _version()}


def _add_request_routes(app: FastAPI, handlers: OpenAIHandlers) -> None:
    """The routes that read a request body: completions, chat completions, /tokenize and /detokenize."""
    prompts = handlers.prompts

    @app.post("/v1/completions")
    async def completions(http: Request):
        req, ids, text = await handlers.admit(http, CompletionRequest, prompts.encode_completion)
        return await handlers.run(ids, text, req, chat=False, http=http)

    @app.post("/v1/chat/completions")
    async def chat(http: Request):
        req, ids, text = await handlers.admit(http, ChatRequest, prompts.encode_chat)
        return await handlers.run(ids, text, req, chat=True, http=http)

    @app.post("/tokenize")
    async def tokenize_route(http: Request) -> dict[str, Any]:
        ids = await handlers.parse_and(http, TokenizeRequest, prompts.token_ids)
        return {"tokens": ids, "count": len(ids), "max_model_len": prompts.max_seq_len}

    @app.post("/detokenize")
    async def detokenize_route(http: Request) -> dict[str, str]:
        return {"prompt": await handlers.parse_and(http, DetokenizeRequest, prompts.detokenize)}

"""The request pipeline behind the OpenAI routes: admission, engine requests, and their answers, whole or streamed."""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .engine_thread import Update
from .http_limits import EventTally, ServerLimits, one_line
from .logprobs_format import TokenTexts, chat_logprobs, completion_logprobs, text_length
from .openai_protocol import BadRequest, CompletionRequest, RequestBody, SamplingRequest, bad_field, parse_request
from .prompt_encoding import Encoder, PromptEncoder, llm_arg

logger = logging.getLogger("ad_cli.http")

# Waits for an engine request's final Update; None (and the request aborted) when the HTTP client left first.
LastUpdate = Callable[[asyncio.Queue, Any, Request], Awaitable[Update | None]]


def _latest(q: asyncio.Queue, upd: Update) -> Update:
    """The newest of `upd` and the updates queued behind it. An update holds the whole output so far, so a
    stream that fell behind the engine sends one chunk with every new token instead of one chunk per step
    (under load, fewer and fuller chunks; nothing is lost)."""
    while not upd.finished and not q.empty():
        upd = q.get_nowait()
    return upd


async def _merged(qs: list[asyncio.Queue]) -> AsyncIterator[tuple[int, Update]]:
    """(choice index, update) from several requests' queues as they arrive, until each has sent its last."""
    if len(qs) == 1:  # the common case, without a task per update
        while True:
            upd = _latest(qs[0], await qs[0].get())
            yield 0, upd
            if upd.finished:
                return
    waiting = {asyncio.ensure_future(q.get()): i for i, q in enumerate(qs)}
    try:
        while waiting:
            ready, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(ready, key=waiting.__getitem__):
                i = waiting.pop(fut)
                upd = _latest(qs[i], fut.result())
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
    tokens: int = 0  # tokens the stream has sent (with their logprobs, when asked)
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


class _Choices:
    """The engine requests of one HTTP request, one per choice; each counts as in flight until released."""

    def __init__(self, engine: Any, qs: list[asyncio.Queue], state: dict[str, Any]):
        self.engine, self.qs, self.state = engine, qs, state
        self.done = [False] * len(qs)
        state["in_flight"] += len(qs)

    def release(self, i: int) -> None:
        if not self.done[i]:
            self.done[i] = True
            self.state["in_flight"] -= 1

    def close(self) -> None:
        for i, q in enumerate(self.qs):
            if not self.done[i]:  # the client went away before the last update: stop the request
                self.engine.abort(q)
            self.release(i)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    # cached_tokens: prompt tokens the prefix cache supplied (the n choices of a request share one prompt).
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class OpenAIHandlers:
    """What the routes share: the engine's state and counts, the server's limits, and the steps of a request.

    `state` holds the request counts ("in_flight", "preparing") and, while the app is up, "engine" and
    "tokenizer_lock" (set by the app's lifespan).
    """

    def __init__(self, llm: Any, model_name: str, default_max_tokens: int, limits: ServerLimits,
                 last_update: LastUpdate):
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.limits = limits
        self.last_update = last_update
        self.state: dict[str, Any] = {"in_flight": 0, "preparing": 0}
        self.max_batch = llm_arg(llm, "max_batch_size") or 0
        self.prompts = PromptEncoder(llm)
        self.tally = EventTally(logger)
        self.token_texts = TokenTexts(getattr(llm, "tokenizer", None))

    def engine_problem(self) -> str | None:
        """Why the engine cannot serve now, or None."""
        engine = self.state.get("engine")
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

    def num_waiting(self) -> int:
        """Requests admitted but not running: preparing here, plus those waiting in the engine."""
        state = self.state
        try:
            waiting = int(state["engine"].num_waiting)
        except Exception:  # noqa: BLE001 - engines without the count: estimate from what is in flight
            waiting = max(0, state["in_flight"] - self.max_batch)
        return waiting + state["preparing"]

    def num_running(self) -> int:
        running = getattr(self.state.get("engine"), "num_running", None)
        if running is None:  # rank 0's engine is in another process: what is in flight and not waiting
            return max(0, self.state["in_flight"] - max(0, self.num_waiting() - self.state["preparing"]))
        return int(running)

    def kv_cache_usage(self) -> float:
        return float(getattr(self.state.get("engine"), "kv_cache_usage", 0.0))

    async def admit(self, http: Request, model: type[SamplingRequest],
                    encode: Encoder) -> tuple[Any, list[int], str | None]:
        """Check the server can take a request, then parse, validate and tokenise it, all off the event loop."""
        reason = self.engine_problem()
        if reason:
            raise BadRequest(503, f"the server cannot serve requests: {reason}")
        if self.num_waiting() >= self.limits.max_queued_requests:
            self.tally.note("503 queue full")
            raise BadRequest(503, f"the server has {self.limits.max_queued_requests} requests waiting; try again")
        self.state["preparing"] += 1
        try:
            body = await http.body()  # already read (and size-checked) by BodyLimitMiddleware
            req = await anyio.to_thread.run_sync(parse_request, body, model)
            self._check_sampling(req)
            ids, text = await anyio.to_thread.run_sync(self.prompts.checked, encode, req,
                                                       limiter=self.state["tokenizer_lock"])
        finally:
            self.state["preparing"] -= 1
        return req, ids, text

    def _check_sampling(self, req: SamplingRequest) -> None:
        """Refuse a token limit over max_seq_len and a logit_bias for ids the vocabulary lacks."""
        limit, max_seq_len = req.max_new_tokens, self.prompts.max_seq_len
        if max_seq_len and limit is not None and limit > max_seq_len:
            raise bad_field(req.max_tokens_param, f"{limit} is more than the server's max_seq_len ({max_seq_len})")
        self.prompts.check_vocab(req.bias, "logit_bias")

    async def parse_and(self, http: Request, model: type[RequestBody], work: Callable[[Any], Any]) -> Any:
        """Parse a request and run `work` on it, both off the event loop (`work` holding the tokenizer)."""
        req = await anyio.to_thread.run_sync(parse_request, await http.body(), model)
        return await anyio.to_thread.run_sync(work, req, limiter=self.state["tokenizer_lock"])

    async def run(self, ids: list[int], text: str | None, req: SamplingRequest, chat: bool, http: Request) -> Any:
        """Submit an admitted request's choices to the engine; its answer, whole or as a stream."""
        echo = req._echo_text if isinstance(req, CompletionRequest) and req.echo else ""
        try:
            params = req.params(self.default_max_tokens)
        except ValueError as e:
            raise BadRequest(400, str(e)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        engine = self.state["engine"]
        # n choices are n requests of the engine, each with its own random stream (SamplingParams.for_choices).
        qs = [engine.submit(ids, p, text, stream=bool(req.stream)) for p in params.for_choices()]
        choices = _Choices(engine, qs, self.state)
        k = params.logprobs
        if req.stream:
            chunks = self.stream(qs, rid, created, chat, choices.release, echo,
                                 len(ids) if req.include_usage else None, k)
            return _Stream(chunks, choices.close, media_type="text/event-stream")
        upds = await self._last_updates(choices, http)
        if upds is None:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        usage = _usage(len(ids), sum(len(u.token_ids) for u in upds), max(u.num_cached_tokens for u in upds))
        body = []
        for i, upd in enumerate(upds):
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": upd.text}}
            else:
                choice = {"index": i, "text": echo + upd.text}
            if k is not None:
                choice["logprobs"] = self.logprobs_of(upd.token_ids, upd.logprobs or [], k, chat, 0)
            body.append({**choice, "finish_reason": upd.finish_reason})
        obj = "chat.completion" if chat else "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.model_name,
                             "choices": body, "usage": usage})

    async def _last_updates(self, choices: _Choices, http: Request) -> list[Update] | None:
        """Each choice's final Update; None when the client went away first (its requests then aborted)."""
        upds = []
        try:
            for i, q in enumerate(choices.qs):
                upd = await self.last_update(q, choices.engine, http)
                choices.release(i)
                if upd is None:
                    return None
                if upd.error:
                    raise BadRequest(500 if upd.internal else 400, upd.error)
                upds.append(upd)
        finally:
            choices.close()
        return upds

    def logprobs_of(self, token_ids: list[int], logprobs: list[dict[int, float]], k: int, chat: bool,
                    offset: int) -> dict[str, Any]:
        if chat:
            return chat_logprobs(token_ids, logprobs, k, self.token_texts)
        return completion_logprobs(token_ids, logprobs, k, self.token_texts, offset)

    async def stream(self, qs: list[asyncio.Queue], rid: str, created: int, chat: bool,
                     release: Callable[[int], None], echo: str, prompt_tokens: int | None,
                     k: int | None) -> AsyncIterator[str]:
        """The request's chunks as server-sent events, each tagged with its choice's index; with `prompt_tokens`
        (include_usage) a last chunk with the usage of all choices and no choices, as OpenAI sends it. With
        logprobs (`k`), a chunk carries those of the tokens that arrived since the choice's previous chunk."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": self.model_name}
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
                choice = self.next_choice(i, shown[i], upd, chat, k)
                if choice is not None:
                    yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        if prompt_tokens is not None and not failed:
            usage = _usage(prompt_tokens, completion_tokens, cached_tokens)
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    def next_choice(self, i: int, shown: _Shown, upd: Update, chat: bool, k: int | None) -> dict[str, Any] | None:
        """Choice i's part of the next chunk: what `upd` adds to what it has shown; None when nothing.

        New tokens get a chunk even when their text is held back (a character not yet complete, a possible stop
        string, a skipped special token), as vLLM streams: the client sees each token arrive (TTFT, ITL) and the
        text follows once it is final."""
        # Hold back a trailing replacement char: the next token may complete the character.
        text = upd.text if upd.finished else upd.text.rstrip("\ufffd")
        delta = text[len(shown.text):]
        if text.startswith(shown.text):
            shown.text = text
        start = shown.tokens
        if not delta and not upd.finished and len(upd.token_ids) <= start:
            return None
        shown.tokens = len(upd.token_ids)
        if chat:
            role = {} if shown.role else {"role": "assistant"}
            choice = {"index": i, "delta": {**role, "content": delta}}
            shown.role = True
        else:
            choice = {"index": i, "text": delta}
        if k is not None:  # the logprobs of the tokens that arrived since the choice's previous chunk
            new = upd.token_ids[start:]
            choice["logprobs"] = self.logprobs_of(new, (upd.logprobs or [])[start:], k, chat, shown.offset)
            shown.offset += text_length(new, self.token_texts)
        return {**choice, "finish_reason": upd.finish_reason}

"""The server's OpenAI request surface, through the official `openai` client against the real HTTP stack.

One server per module: ad-serve's stack (uvicorn with the guarded protocol, `build_app`, the engine thread) on
a free port in a thread of this process, over the bundled model cut to 2 layers (its answers are gibberish
but deterministic, which is all that equal-answer checks need), with `--api-key` set: the client sends the
key, and the key's own tests send none or a wrong one. Every field is checked streamed and not.
"""

import importlib.metadata
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402 - after the skip

pytestmark = pytest.mark.slow

MODEL = "smollm2-2-layers"
KEY = "sk-test-0123456789"
MAX_SEQ_LEN = 192
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The base URL of the server (with an API key) over a 2-layer bundled model."""
    from ad_cli.http_limits import ServerLimits
    from ad_cli.http_server import bind_socket, make_server
    from ad_cli.server_app import build_app
    from ad_runtime import LLM

    llm = LLM(device="cpu", max_seq_len=MAX_SEQ_LEN, max_batch_size=4, model_kwargs={"num_hidden_layers": 2})
    limits = ServerLimits(header_timeout=60, body_timeout=60)  # a busy machine must not turn a slow read into 408
    app = build_app(llm, MODEL, default_max_tokens=16, limits=limits, api_key=KEY)
    sock = bind_socket("127.0.0.1", 0)
    srv = make_server(app, limits, log_level="warning")
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="surface-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not srv.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.started, "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(30)
        llm.shutdown()


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[Any]:
    with openai.OpenAI(api_key=KEY, base_url=f"{server}/v1", max_retries=0, timeout=120) as c:
        yield c


def _complete(client: Any, stream: bool, **kw: Any) -> tuple[str, str, Any]:
    """(text, finish_reason, usage or None) of a completion, streamed or not."""
    kw = {"model": MODEL, "prompt": PROMPT, **kw}
    if not stream:
        r = client.completions.create(**kw)
        (choice,) = r.choices
        return choice.text, choice.finish_reason, r.usage
    chunks = list(client.completions.create(stream=True, **kw))
    texts = [c.choices[0].text for c in chunks if c.choices]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) <= 1 and not any(reasons[:-1]), chunks
    return "".join(texts), reasons[-1], (usage[0] if usage else None)


def _chat(client: Any, stream: bool, **kw: Any) -> tuple[str, str, Any]:
    """(content, finish_reason, usage or None) of a chat completion, streamed or not."""
    kw = {"model": MODEL, "messages": CHAT, **kw}
    if not stream:
        r = client.chat.completions.create(**kw)
        (choice,) = r.choices
        assert choice.message.role == "assistant"
        return choice.message.content, choice.finish_reason, r.usage
    chunks = list(client.chat.completions.create(stream=True, **kw))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    reasons = [c.choices[0].finish_reason for c in with_choices]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) <= 1 and not any(reasons[:-1]), chunks
    return "".join(c.choices[0].delta.content or "" for c in with_choices), reasons[-1], (usage[0] if usage else None)


def _refused(call: Any, param: str, needle: str) -> None:
    """`call()` gets a 400 whose OpenAI error names `param` and says `needle`."""
    with pytest.raises(openai.BadRequestError) as info:
        r = call()
        if isinstance(r, openai.Stream):
            list(r)
    err = info.value.body
    assert info.value.status_code == 400 and err["param"] == param and needle in err["message"], err
    assert err["message"].startswith(param) and err["type"] == "invalid_request_error", err


def _post(server: str, path: str, body: dict[str, Any], auth: str | None = f"Bearer {KEY}") -> httpx.Response:
    headers = {"Authorization": auth} if auth is not None else {}
    return httpx.post(f"{server}{path}", json=body, headers=headers, timeout=120)


# ---- fields the server honours ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_max_completion_tokens_is_max_tokens(client: Any, stream: bool) -> None:
    by_old = _complete(client, stream, temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    by_new = _complete(client, stream, temperature=0, extra_body={"max_completion_tokens": 5, "ignore_eos": True})
    assert by_old[:2] == by_new[:2] and by_old[1] == "length" and by_old[0]
    old = _chat(client, stream, temperature=0, max_tokens=6, extra_body={"ignore_eos": True})
    new = _chat(client, stream, temperature=0, max_completion_tokens=6, extra_body={"ignore_eos": True})
    both = _chat(client, stream, temperature=0, max_tokens=6, max_completion_tokens=6, extra_body={"ignore_eos": True})
    assert old[:2] == new[:2] == both[:2] and old[1] == "length"
    _refused(lambda: client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,
                                                    max_completion_tokens=7, stream=stream),
             "max_completion_tokens", "differs from max_tokens")
    _refused(lambda: client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=1000,
                                                    stream=stream), "max_completion_tokens", "max_seq_len")


@pytest.mark.parametrize("stream", [False, True])
def test_include_usage_gives_a_last_chunk_with_the_counts(client: Any, server: str, stream: bool) -> None:
    opts = {"stream_options": {"include_usage": True}} if stream else {}
    text, reason, usage = _complete(client, stream, **GREEDY, extra_body={"ignore_eos": True}, **opts)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY, extra_body={"ignore_eos": True})
    assert text == plain.choices[0].text and reason == "length"
    assert usage is not None and usage.model_dump(exclude_none=True) == {
        "prompt_tokens": plain.usage.prompt_tokens, "completion_tokens": 8, "total_tokens": plain.usage.total_tokens}
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 8
    _, _, chat_usage = _chat(client, stream, **GREEDY, **opts)
    chat_plain = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    assert chat_usage.model_dump(exclude_none=True) == chat_plain.usage.model_dump(exclude_none=True)
    if stream:  # the usage chunk: last before [DONE], no choices; none without include_usage
        raw = _post(server, "/v1/completions", {"prompt": PROMPT, **GREEDY, "stream": True, **opts})
        events = [ln[6:] for ln in raw.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and '"choices": []' in events[-2] and '"usage": {' in events[-2]
        assert all('"usage": null' in e for e in events[:-2])
        assert _complete(client, True, **GREEDY)[2] is None
        _refused(lambda: client.completions.create(model=MODEL, prompt=PROMPT, stream_options={"include_usage": True}),
                 "stream_options", "stream")


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_the_prompt_first(client: Any, server: str, stream: bool) -> None:
    text, _, _ = _complete(client, stream, **GREEDY)
    echoed, _, _ = _complete(client, stream, **GREEDY, echo=True)
    assert echoed == PROMPT + text
    if stream:
        first = next(iter(client.completions.create(model=MODEL, prompt=PROMPT, echo=True, stream=True, **GREEDY)))
        assert first.choices[0].text == PROMPT
    ids = [1, 504, 3458]  # a token-id prompt echoes its text
    plain, _, _ = _complete(client, stream, prompt=ids, **GREEDY)
    decoded = _post(server, "/detokenize", {"tokens": ids}).json()["prompt"]
    assert _complete(client, stream, prompt=ids, echo=True, **GREEDY)[0] == decoded + plain
    _refused(lambda: client.chat.completions.create(model=MODEL, messages=CHAT, stream=stream,
                                                    extra_body={"echo": True}), "echo", "not supported yet")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_token_ids_stop(client: Any, server: str, stream: bool) -> None:
    first, _, _ = _complete(client, False, temperature=0, max_tokens=1)
    (first_id,) = _post(server, "/tokenize", {"prompt": first, "add_special_tokens": False}).json()["tokens"]
    free = _complete(client, stream, **GREEDY, extra_body={"ignore_eos": True})
    assert free[1] == "length"
    opts = {"stream_options": {"include_usage": True}} if stream else {}
    text, reason, usage = _complete(client, stream, **GREEDY, **opts,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [first_id]})
    assert reason == "stop" and usage.completion_tokens == 1 and free[0].startswith(text)
    _refused(lambda: client.completions.create(model=MODEL, prompt=PROMPT, stream=stream,
                                               extra_body={"stop_token_ids": [-1]}),
             "stop_token_ids.0", "greater than or equal to 0")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_and_include_stop_str_in_output(client: Any, stream: bool) -> None:
    free, _, _ = _complete(client, stream, temperature=0, max_tokens=16, extra_body={"ignore_eos": True})
    word = free.split()[1]  # a piece of the answer past its start
    cut, reason, _ = _complete(client, stream, temperature=0, max_tokens=16, stop=word,
                               extra_body={"ignore_eos": True})
    assert reason == "stop" and word not in cut and free.startswith(cut)
    kept, _, _ = _complete(client, stream, temperature=0, max_tokens=16, stop=[word, "\x00never"],
                           extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept == cut + word


@pytest.mark.parametrize("stream", [False, True])
def test_sampling_fields(client: Any, stream: bool) -> None:
    greedy = _chat(client, stream, **GREEDY)
    # top_k 1 is greedy at any temperature; the other fields ride along.
    assert _chat(client, stream, temperature=1.0, top_p=0.9, max_tokens=8, user="someone", seed=3,
                 extra_body={"top_k": 1, "skip_special_tokens": True, "ignore_eos": False})[:2] == greedy[:2]
    seeded = [_complete(client, stream, temperature=1.0, max_tokens=8, seed=7)[0] for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert _complete(client, stream, model="any-name-at-all", **GREEDY)[0] == _complete(client, stream, **GREEDY)[0]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_content_parts_equal_a_plain_string(client: Any, stream: bool) -> None:
    plain = _chat(client, stream, **GREEDY)
    one = [{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}]
    assert _chat(client, stream, messages=one, **GREEDY)[:2] == plain[:2]
    two_parts = [{"role": "user", "content": [{"type": "text", "text": "Hello."}, {"type": "text", "text": "Hi?"}]}]
    joined = [{"role": "user", "content": "Hello.\nHi?"}]
    assert _chat(client, stream, messages=two_parts, **GREEDY)[:2] == _chat(client, stream, messages=joined,
                                                                             **GREEDY)[:2]
    image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]
    _refused(lambda: client.chat.completions.create(model=MODEL, messages=image, stream=stream),
             "messages.0.content.1.type", "only text parts")


# ---- fields the server refuses ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_unsupported_fields_are_refused_by_name(client: Any, stream: bool) -> None:
    chat = {"model": MODEL, "messages": CHAT, "stream": stream}
    completion = {"model": MODEL, "prompt": PROMPT, "stream": stream}
    _refused(lambda: client.chat.completions.create(**chat, n=2), "n", "only 1 is supported")
    _refused(lambda: client.completions.create(**completion, n=3), "n", "only 1 is supported")
    _refused(lambda: client.chat.completions.create(**chat, logprobs=True), "logprobs", "not supported yet")
    _refused(lambda: client.completions.create(**completion, logprobs=1), "logprobs", "not supported yet")
    _refused(lambda: client.chat.completions.create(**chat, presence_penalty=0.5), "presence_penalty",
             "not supported yet")
    _refused(lambda: client.completions.create(**completion, suffix="!"), "suffix", "not supported yet")
    _refused(lambda: client.chat.completions.create(**chat, extra_body={"frobnicate": 1}), "frobnicate",
             "unknown field")
    _refused(lambda: client.completions.create(**completion, extra_body={"guided_grammar": 'root ::= "a"'}),
             "guided_grammar", "not supported yet")


@pytest.mark.parametrize("stream", [False, True])
def test_off_values_of_unsupported_fields_are_accepted(client: Any, stream: bool) -> None:
    """What clients send by default: n 1, zero penalties, no logprobs, no tools."""
    expected = _chat(client, stream, **GREEDY)
    defaults = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "top_logprobs": 0,
                "logit_bias": {}, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}}
    assert _chat(client, stream, **GREEDY, **defaults, extra_body={"repetition_penalty": 1.0})[:2] == expected[:2]
    assert _complete(client, stream, **GREEDY, n=1, best_of=1, logprobs=None, presence_penalty=0)[0] == \
        _complete(client, stream, **GREEDY)[0]
    # An answer sent back as the client got it carries refusal, tool_calls, audio, ... as null.
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY).choices[0].message
    follow_up = [*CHAT, reply.model_dump(), {"role": "user", "content": "And of Italy?"}]
    plain = [*CHAT, {"role": "assistant", "content": reply.content}, follow_up[-1]]
    assert _chat(client, stream, messages=follow_up, **GREEDY)[:2] == _chat(client, stream, messages=plain,
                                                                             **GREEDY)[:2]
    named = [{**CHAT[0], "name": "ann"}]
    _refused(lambda: client.chat.completions.create(model=MODEL, messages=named, stream=stream),
             "messages.0.name", "not supported yet")


# ---- /tokenize, /detokenize, /version -----------------------------------------------------------------


def test_tokenize_counts_what_a_request_uses(client: Any, server: str) -> None:
    chat_tokens = _post(server, "/tokenize", {"messages": CHAT}).json()
    usage = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY).usage
    assert chat_tokens["count"] == len(chat_tokens["tokens"]) == usage.prompt_tokens
    assert chat_tokens["max_model_len"] == MAX_SEQ_LEN
    parts = [{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}]
    assert _post(server, "/tokenize", {"messages": parts}).json() == chat_tokens
    text_tokens = _post(server, "/tokenize", {"prompt": PROMPT}).json()
    assert text_tokens["count"] == client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).usage.prompt_tokens
    r = _post(server, "/tokenize", {"prompt": PROMPT, "messages": CHAT})
    assert r.status_code == 400 and "either prompt" in r.json()["error"]["message"]
    r = _post(server, "/tokenize", {"prompt": PROMPT, "frobnicate": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"


def test_detokenize_round_trips(server: str) -> None:
    for text in (PROMPT, "Ünïcödé, emoji 🙂 and\nnew lines."):
        ids = _post(server, "/tokenize", {"prompt": text}).json()["tokens"]
        assert _post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": text}
    r = _post(server, "/detokenize", {"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_version(server: str) -> None:
    r = httpx.get(f"{server}/version")  # no key needed
    assert r.status_code == 200 and r.json() == {"version": importlib.metadata.version("ad-cli")}


# ---- --api-key ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Bearer {KEY}x", f"Basic {KEY}", KEY])
def test_api_key_is_required(server: str, auth: str | None) -> None:
    for path, body in [("/v1/chat/completions", {"messages": CHAT, **GREEDY}), ("/v1/completions", {"prompt": PROMPT}),
                       ("/tokenize", {"prompt": PROMPT}), ("/detokenize", {"tokens": [1]})]:
        r = _post(server, path, body, auth=auth)
        assert r.status_code == 401, (path, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and r.headers["www-authenticate"] == "Bearer"
        assert ("invalid API key" if (auth or "").startswith("Bearer") else "no API key") in err["message"]
    headers = {"Authorization": auth} if auth is not None else {}
    assert httpx.get(f"{server}/v1/models", headers=headers).status_code == 401
    assert httpx.get(f"{server}/health", headers=headers).json() == {"status": "ok"}
    assert httpx.get(f"{server}/version", headers=headers).status_code == 200
    with openai.OpenAI(api_key="wrong-key", base_url=f"{server}/v1", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_right_api_key_is_served(client: Any, server: str) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert _post(server, "/v1/chat/completions", {"messages": CHAT, **GREEDY}).status_code == 200
    assert _post(server, "/detokenize", {"tokens": [1]}).status_code == 200
    lower = httpx.post(f"{server}/tokenize", json={"prompt": "hi"}, headers={"authorization": f"bearer {KEY}"})
    assert lower.status_code == 200  # the scheme is case-insensitive


def test_api_key_option_in_help_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from ad_cli.serve import server_parser

    monkeypatch.delenv("SERVE_API_KEY", raising=False)
    text = server_parser().format_help()
    assert "--api-key KEY" in text and "Authorization: Bearer KEY" in text and "SERVE_API_KEY" in text
    assert server_parser().parse_args([]).api_key is None
    monkeypatch.setenv("SERVE_API_KEY", "from-env")
    assert server_parser().parse_args([]).api_key == "from-env"
    assert server_parser().parse_args(["--api-key", "given"]).api_key == "given"

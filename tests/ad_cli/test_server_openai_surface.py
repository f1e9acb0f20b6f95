"""The server's OpenAI request surface, through the official `openai` client against the real HTTP stack.

One server per module: ad-serve's stack (uvicorn with the guarded protocol, `build_app`, the engine thread) on
a free port in a thread of this process, over the bundled model cut to 2 layers (its answers are gibberish
but deterministic, which is all that equal-answer checks need), with `--api-key` set: the client sends the
key, and the key's own tests send none or a wrong one. Every field is checked streamed and not.
"""

import importlib.metadata
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
def served() -> Iterator[tuple[str, Any]]:
    """The base URL of the server (with an API key) over a 2-layer bundled model, and the LLM it serves."""
    from ad_cli.http_limits import ServerLimits
    from ad_runtime import LLM
    from server_harness import serve_in_thread

    llm = LLM(device="cpu", max_seq_len=MAX_SEQ_LEN, max_batch_size=4, model_kwargs={"num_hidden_layers": 2})
    limits = ServerLimits(header_timeout=60, body_timeout=60)  # a busy machine must not turn a slow read into 408
    with serve_in_thread(llm, MODEL, limits, "surface-server", default_max_tokens=16, api_key=KEY) as url:
        yield url, llm


@pytest.fixture(scope="module")
def server(served: tuple[str, Any]) -> str:
    return served[0]


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
    # A prompt shorter than one KV page: the prefix cache holds none of it.
    assert usage is not None and usage.model_dump(exclude_none=True) == {
        "prompt_tokens": plain.usage.prompt_tokens, "completion_tokens": 8, "total_tokens": plain.usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": 0}}
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 8
    _, _, chat_usage = _chat(client, stream, **GREEDY, **opts)
    chat_plain = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(chat_usage, k) for k in counts] == [getattr(chat_plain.usage, k) for k in counts]
    # (the chat template may make the prompt longer than a page: the second request can find it cached)
    assert chat_plain.usage.prompt_tokens_details.cached_tokens >= chat_usage.prompt_tokens_details.cached_tokens
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


# ---- n, logprobs, penalties, logit_bias, min_tokens ----------------------------------------------------


class _Reference:
    """Hugging Face's model (fp32, the same 2 layers as the server) on the CPU."""

    def __init__(self) -> None:
        import torch
        from ad_compiler.models.bundled import bundled_model_dir
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(bundled_model_dir(), num_hidden_layers=2,
                                                          dtype=torch.float32).eval()

    def logits(self, ids: list[int]) -> Any:
        """[len(ids), V]: the logits after each token."""
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0].float()

    def __call__(self, ids: list[int]) -> Any:
        """[len(ids), V]: the log-softmax after each token."""
        return self.logits(ids).log_softmax(dim=-1)


@pytest.fixture(scope="module")
def reference() -> _Reference:
    return _Reference()


@pytest.fixture(scope="module")
def token_text(served: tuple[str, Any]) -> Any:
    from ad_cli.logprobs_format import TokenTexts

    texts = TokenTexts(served[1].tokenizer)
    return lambda t: texts(t)[0]


def _greedy_reference(reference: Any, prompt: list[int], n: int) -> tuple[list[int], Any]:
    """Hugging Face's greedy continuation of `prompt` (n tokens) and the log-softmax at each generated position."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(reference(ids)[-1].argmax()))
    return ids[len(prompt):], reference(ids)[len(prompt) - 1 : -1]


def _run_choices(client: Any, chat: bool, stream: bool, **kw: Any) -> tuple[list[dict[str, Any]], Any]:
    """Each choice of a request (by index) as {text, finish_reason, logprobs: [(token, logprob, {token: logprob})],
    offsets}, streamed chunks joined, and the usage."""
    if chat:
        kw = {"model": MODEL, "messages": CHAT, **kw}
        create = client.chat.completions.create
    else:
        kw = {"model": MODEL, "prompt": PROMPT, **kw}
        create = client.completions.create
    out: dict[int, dict[str, Any]] = {}

    def add(choice: Any, text: str | None) -> None:
        c = out.setdefault(choice.index, {"text": "", "finish_reason": None, "logprobs": None, "offsets": []})
        assert c["finish_reason"] is None, "a chunk after the choice's last"
        c["text"] += text or ""
        c["finish_reason"] = choice.finish_reason
        lp = choice.logprobs
        if lp is None:
            return
        c["logprobs"] = c["logprobs"] or []
        if chat:
            for e in lp.content:
                assert bytes(e.bytes).decode("utf-8", "replace") == e.token or e.token.startswith("bytes:")
                c["logprobs"].append((e.token, e.logprob, {t.token: t.logprob for t in e.top_logprobs}))
        else:
            c["logprobs"] += list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
            c["offsets"] += lp.text_offset

    if not stream:
        r = create(**kw)
        assert [c.index for c in r.choices] == list(range(len(r.choices)))
        for choice in r.choices:
            add(choice, choice.message.content if chat else choice.text)
        usage = r.usage
    else:
        chunks = list(create(stream=True, stream_options={"include_usage": True}, **kw))
        for chunk in chunks[:-1]:
            (choice,) = chunk.choices  # one choice per chunk, tagged with its index
            add(choice, choice.delta.content if chat else choice.text)
        assert not chunks[-1].choices
        usage = chunks[-1].usage
    return [out[i] for i in sorted(out)], usage


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_n_choices_differ_when_sampled_and_agree_when_greedy(client: Any, chat: bool, stream: bool) -> None:
    sampled, usage = _run_choices(client, chat, stream, n=3, temperature=1.0, seed=11, max_tokens=8,
                                  extra_body={"ignore_eos": True})
    assert len(sampled) == 3 and len({c["text"] for c in sampled}) == 3, sampled
    assert usage.completion_tokens == 3 * 8 and usage.total_tokens == usage.prompt_tokens + 24
    again, _ = _run_choices(client, chat, not stream, n=3, temperature=1.0, seed=11, max_tokens=8,
                            extra_body={"ignore_eos": True})
    assert [c["text"] for c in again] == [c["text"] for c in sampled]  # seeds per choice: the same n answers
    greedy, usage = _run_choices(client, chat, stream, n=2, **GREEDY, extra_body={"ignore_eos": True})
    one, _ = _run_choices(client, chat, stream, **GREEDY, extra_body={"ignore_eos": True})
    assert [c["text"] for c in greedy] == [one[0]["text"]] * 2 and usage.completion_tokens == 16
    assert {c["finish_reason"] for c in greedy} == {"length"}
    _refused(lambda: client.completions.create(model=MODEL, prompt=PROMPT, n=129, stream=stream), "n",
             "less than or equal to 128")


def _assert_logprobs_match(got: list[tuple], ids: list[int], ref: Any, k: int, token_text: Any) -> None:
    """Each token's text, logprob and top k equal the reference's (log-softmax of Hugging Face's logits)."""
    assert len(got) == len(ids)
    for pos, ((token, logprob, top), tid) in enumerate(zip(got, ids)):
        assert token == token_text(tid), pos
        assert abs(logprob - float(ref[pos, tid])) < 1e-4, (pos, logprob, float(ref[pos, tid]))
        best = ref[pos].topk(k)
        want = {token_text(int(t)): float(v) for t, v in zip(best.indices, best.values)}
        assert set(want) <= set(top) and len(top) <= k + 1, (pos, top, want)
        assert all(abs(top[t] - v) < 1e-4 for t, v in want.items()), (pos, top, want)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_equal_the_models_log_softmax(client: Any, server: str, reference: Any, token_text: Any,
                                                          stream: bool) -> None:
    prompt = _post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    ids, ref = _greedy_reference(reference, prompt, 6)
    (choice,), _ = _run_choices(client, False, stream, prompt=prompt, temperature=0, max_tokens=6, logprobs=3,
                                extra_body={"ignore_eos": True})
    _assert_logprobs_match(choice["logprobs"], ids, ref, 3, token_text)
    texts = [token_text(t) for t in ids]
    assert choice["offsets"] == [sum(len(t) for t in texts[:i]) for i in range(len(ids))]
    assert choice["text"] == "".join(texts)
    # logprobs 0: the sampled token's own, and nothing else
    (only,), _ = _run_choices(client, False, stream, prompt=prompt, temperature=0, max_tokens=6, logprobs=0,
                              extra_body={"ignore_eos": True})
    _assert_logprobs_match(only["logprobs"], ids, ref, 0, token_text)
    assert all(list(top) == [tok] for tok, _, top in only["logprobs"])
    # with echo, OpenAI's answer holds the prompt's logprobs too, which the server does not compute
    _refused(lambda: client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, stream=stream),
             "logprobs", "echo")
    for bad in (21, True):
        _refused(lambda: client.completions.create(model=MODEL, prompt=PROMPT, logprobs=bad, stream=stream),
                 "logprobs", "")


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_the_models_log_softmax(client: Any, server: str, reference: Any, token_text: Any,
                                                    stream: bool) -> None:
    prompt = _post(server, "/tokenize", {"messages": CHAT}).json()["tokens"]
    ids, ref = _greedy_reference(reference, prompt, 6)
    (choice,), _ = _run_choices(client, True, stream, temperature=0, max_tokens=6, logprobs=True, top_logprobs=4,
                                extra_body={"ignore_eos": True})
    _assert_logprobs_match(choice["logprobs"], ids, ref, 4, token_text)
    assert all(len(top) == 4 for _, _, top in choice["logprobs"])  # chat lists exactly the k best
    (plain,), _ = _run_choices(client, True, stream, temperature=0, max_tokens=6, logprobs=True,
                               extra_body={"ignore_eos": True})
    _assert_logprobs_match(plain["logprobs"], ids, ref, 0, token_text)
    (off,), _ = _run_choices(client, True, stream, temperature=0, max_tokens=6, extra_body={"ignore_eos": True})
    assert off["logprobs"] is None
    _refused(lambda: client.chat.completions.create(model=MODEL, messages=CHAT, top_logprobs=2, stream=stream),
             "top_logprobs", "needs logprobs: true")
    _refused(lambda: client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=21,
                                                    stream=stream), "top_logprobs", "")


def test_sampled_logprobs_are_raw_and_penalties_act_as_defined(served: tuple[str, Any], reference: Any) -> None:
    """Through the Python API of the served LLM (token ids at hand): at temperature 1 with penalties the logprobs
    are still the model's own log-softmax; greedy with penalties picks the argmax of the penalised logits."""
    from ad_runtime import SamplingParams

    llm = served[1]
    prompt = llm.encode(PROMPT, chat_template=False)[0]
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True, logprobs=2, n=2,
                            frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={30: -5.0})
    (out,) = llm.generate([prompt], params, chat_template=False)
    assert out.outputs[0].token_ids != out.outputs[1].token_ids
    for choice in out.outputs:
        ref = reference(prompt + choice.token_ids)[len(prompt) - 1 : -1]
        for pos, (tid, entries) in enumerate(zip(choice.token_ids, choice.logprobs)):
            assert abs(entries[tid] - float(ref[pos, tid])) < 1e-4
            best = ref[pos].topk(2)
            assert all(abs(entries[int(t)] - float(v)) < 1e-4 for t, v in zip(best.indices, best.values))
    plain = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                         chat_template=False)[0].outputs[0].token_ids
    for kw in ({"presence_penalty": 1.5}, {"frequency_penalty": 0.7}, {"repetition_penalty": 1.8},
               {"presence_penalty": -0.5, "frequency_penalty": 0.3, "repetition_penalty": 0.8}):
        sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, **kw)
        ids = llm.generate([prompt], sp, chat_template=False)[0].outputs[0].token_ids
        assert ids != plain, kw
        logits = reference.logits(prompt + ids)[len(prompt) - 1 : -1]
        rp = kw.get("repetition_penalty", 1.0)
        for pos, row in enumerate(logits):
            # By hand: the repetition penalty on tokens of the prompt and the output so far (a positive logit
            # divided, a negative one multiplied), then presence and frequency on the output so far.
            before = ids[:pos]
            for t in set(prompt) | set(before):
                row[t] = row[t] / rp if row[t] > 0 else row[t] * rp
            for t in set(before):
                row[t] -= kw.get("frequency_penalty", 0.0) * before.count(t) + kw.get("presence_penalty", 0.0)
            top2 = row.topk(2).values
            if top2[0] - top2[1] > 1e-3:  # a near tie could go either way between two implementations
                assert int(row.argmax()) == ids[pos], (kw, pos)


def test_python_api_streams_n_choices_with_logprobs(served: tuple[str, Any]) -> None:
    from ad_runtime import SamplingParams

    llm = served[1]
    sp = SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=6, ignore_eos=True, logprobs=1)
    (batch,) = llm.generate([PROMPT], sp, chat_template=False)
    updates = list(llm.generate_stream(PROMPT, sp, chat_template=False))
    assert [o.index for o in batch.outputs] == [0, 1] and batch.outputs[0].token_ids != batch.outputs[1].token_ids
    for upd in updates:
        assert [o.index for o in upd.outputs] == [0, 1]
        assert all(len(o.logprobs) == len(o.token_ids) for o in upd.outputs)
    assert len(updates) > 2 and not updates[-2].finished and updates[-1].finished
    for streamed, whole in zip(updates[-1].outputs, batch.outputs):
        assert streamed.token_ids == whole.token_ids and streamed.text == whole.text
        assert [list(d) for d in streamed.logprobs] == [list(d) for d in whole.logprobs]
        assert all(abs(a[t] - b[t]) < 1e-5 for a, b in zip(streamed.logprobs, whole.logprobs) for t in a)


@pytest.mark.parametrize("stream", [False, True])
def test_penalties_reach_the_sampler(client: Any, served: tuple[str, Any], stream: bool) -> None:
    """Each penalty gives the server the answer the Python API gives (whose math the test above checks); the
    largest presence and frequency penalties make a greedy run that repeats itself never repeat a token."""
    from ad_runtime import SamplingParams

    llm = served[1]
    for openai_kw, extra in (({"presence_penalty": 1.5}, {}), ({"frequency_penalty": -0.7}, {}),
                             ({}, {"repetition_penalty": 1.8})):
        want = llm.generate([PROMPT], _greedy(8, **openai_kw, **extra), chat_template=False)[0].outputs[0].text
        got = _complete(client, stream, temperature=0, max_tokens=8, extra_body={"ignore_eos": True, **extra},
                        **openai_kw)[0]
        assert got == want, (openai_kw, extra)

    def tokens(max_tokens: int, **kw: Any) -> list[str]:
        (choice,), _ = _run_choices(client, False, stream, temperature=0, max_tokens=max_tokens, logprobs=0, **kw)
        return [t for t, _, _ in choice["logprobs"]]

    no_eos = {"ignore_eos": True}
    assert len(set(tokens(8, extra_body=no_eos))) < 8, "the plain greedy run should repeat tokens"
    # OpenAI's largest penalties (2) outweigh this model's lead for 8 tokens; an unbounded repetition penalty for 16.
    assert len(set(tokens(8, presence_penalty=2, frequency_penalty=2, extra_body=no_eos))) == 8
    assert len(set(tokens(16, extra_body={**no_eos, "repetition_penalty": 100}))) == 16
    for field, value, param in [("presence_penalty", 2.5, "presence_penalty"), ("frequency_penalty", -3, None),
                                ("repetition_penalty", 0, None)]:
        body = {"extra_body": {field: value}} if field == "repetition_penalty" else {field: value}
        _refused(lambda: client.completions.create(model=MODEL, prompt=PROMPT, stream=stream, **body),
                 param or field, "")


@pytest.mark.parametrize("stream", [False, True])
def test_logit_bias_forces_and_bans_tokens(client: Any, served: tuple[str, Any], token_text: Any, stream: bool
                                           ) -> None:
    forced = 28
    for temperature in (0, 1.0):
        text = _complete(client, stream, temperature=temperature, seed=3, max_tokens=5,
                         logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})[0]
        assert text == token_text(forced) * 5
    # -100 bans the greedy answer's first token (at temperature 0, the best one): another token comes first
    (plain,), _ = _run_choices(client, False, stream, **GREEDY, logprobs=0, extra_body={"ignore_eos": True})
    first = plain["logprobs"][0]
    best = served[1].generate([PROMPT], _greedy(1), chat_template=False)[0].outputs[0].token_ids[0]
    assert token_text(best) == first[0]
    (banned,), _ = _run_choices(client, False, stream, **GREEDY, logprobs=1, logit_bias={str(best): -100},
                                extra_body={"ignore_eos": True})
    assert banned["logprobs"][0][0] != first[0]
    assert banned["logprobs"][0][1] < first[1]  # the raw logprob of the runner-up
    for bad, param in [({"x1": 1}, "logit_bias"), ({"5": 101}, "logit_bias.5"), ({str(10**7): 1}, "logit_bias")]:
        _refused(lambda: client.completions.create(model=MODEL, prompt=PROMPT, logit_bias=bad, stream=stream),
                 param, "")


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_holds_back_end_and_stop_tokens(client: Any, served: tuple[str, Any], stream: bool) -> None:
    eos = min(served[1].engine.eos_token_ids)
    force_eos = {"logit_bias": {str(eos): 100}}
    for chat in (False, True):
        (now,), usage = _run_choices(client, chat, stream, temperature=0, max_tokens=8, **force_eos)
        assert now["finish_reason"] == "stop" and usage.completion_tokens == 0
        (later,), usage = _run_choices(client, chat, stream, temperature=0, max_tokens=8, **force_eos,
                                       extra_body={"min_tokens": 3})
        assert later["finish_reason"] == "stop" and usage.completion_tokens == 3 and later["text"]
    # stop_token_ids too: the greedy answer's first token as a stop token ends the run at once, unless min_tokens
    # holds it back (then it cannot come first, and the run goes on)
    llm = served[1]
    first = llm.generate([PROMPT], _greedy(1), chat_template=False)[0].outputs[0].token_ids[0]
    stopped = _complete(client, stream, temperature=0, max_tokens=6, extra_body={"stop_token_ids": [first]})
    assert stopped[1] == "stop" and stopped[0] == llm.tokenizer.decode([first])
    held, _, _ = _complete(client, stream, temperature=0, max_tokens=6,
                           extra_body={"stop_token_ids": [first], "min_tokens": 4, "ignore_eos": True})
    assert not held.startswith(stopped[0]) and len(held) > len(stopped[0])
    _refused(lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=stream,
                                               extra_body={"min_tokens": 5}), "min_tokens", "more than max_tokens")


def _greedy(n: int, **kw: Any) -> Any:
    from ad_runtime import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


# ---- fields the server refuses ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_unsupported_fields_are_refused_by_name(client: Any, stream: bool) -> None:
    chat = {"model": MODEL, "messages": CHAT, "stream": stream}
    completion = {"model": MODEL, "prompt": PROMPT, "stream": stream}
    _refused(lambda: client.completions.create(**completion, best_of=2), "best_of", "not supported yet")
    _refused(lambda: client.completions.create(**completion, extra_body={"prompt_logprobs": 1}), "prompt_logprobs",
             "not supported yet")
    _refused(lambda: client.chat.completions.create(**chat, extra_body={"min_p": 0.1}), "min_p", "not supported yet")
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


@pytest.mark.parametrize("stream", [False, True])
def test_usage_reports_the_prompt_tokens_the_prefix_cache_supplied(client: Any, stream: bool) -> None:
    # A prompt of several 64-token pages, sent twice: the second finds the first's full pages in the cache.
    words = ("streamed " if stream else "plain ") + " ".join(f"word{i}" for i in range(50))
    extra = {"stream_options": {"include_usage": True}} if stream else {}

    def usage() -> Any:
        out = client.completions.create(model=MODEL, prompt=words, max_tokens=2, temperature=0, stream=stream,
                                        **extra)
        return [c for c in out if c.usage][-1].usage if stream else out.usage

    first, second = usage(), usage()
    assert first.prompt_tokens == second.prompt_tokens >= 128
    assert first.prompt_tokens_details.cached_tokens == 0
    cached = second.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 64 == 0 and cached < second.prompt_tokens, cached

"""The LLM API on the bundled model: a bad request fails alone, threads share it safely, plain strings get the chat template."""

import threading

import pytest
from ad_runtime import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name a color.", "Count to five.", "Say hello."]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    # Four layers: these tests compare runs of the same model with each other, not with Hugging Face.
    with LLM(device="cpu", max_seq_len=128, max_batch_size=4, model_kwargs={"num_hidden_layers": 4}) as engine:
        yield engine


@pytest.fixture(scope="module")
def expected(llm):
    return [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in PROMPTS]


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_bad_parameters_fail_in_the_callers_hands_and_the_next_call_succeeds(llm, expected):
    with pytest.raises(ValueError, match="seed"):
        llm.generate(PROMPTS[0], SamplingParams(seed=2**70))
    with pytest.raises(ValueError, match="stop"):
        llm.generate(PROMPTS[0], SamplingParams(stop=[None]))  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not valid Unicode"):
        llm.generate(["fine", "bad \ud800 text"], GREEDY)
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == expected
    assert llm.engine.scheduler.pool.num_free_pages == llm.engine.scheduler.num_pages


def test_a_request_broken_after_validation_fails_alone_in_its_batch(llm, expected):
    bad = SamplingParams(max_tokens=12, temperature=0.7, seed=1)
    bad.seed = 2**70  # smuggled past validation: the engine must still contain it
    outs = llm.generate(PROMPTS[:2] + [PROMPTS[2]], [GREEDY, bad, GREEDY])
    assert outs[1].error and "invalid request" in outs[1].error
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == [expected[0], expected[2]]
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == expected


def test_tiny_temperature_is_greedy_not_token_zero(llm, expected):
    assert _tokens(llm.generate(PROMPTS[:2], SamplingParams(max_tokens=12, temperature=1e-300, ignore_eos=True))) == (
        expected[:2]
    )


def test_three_threads_at_once_each_get_their_tokens(llm, expected):
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def call(k: int) -> None:
        try:
            start.wait()
            if k == 2:
                *_, last = llm.generate_stream(PROMPTS[3], GREEDY)
                results[k] = [last.outputs[0].token_ids]
            else:
                results[k] = _tokens(llm.generate(PROMPTS[k * 2 : k * 2 + 2], GREEDY))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert results == {0: expected[:2], 1: expected[2:], 2: [expected[3]]}
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == expected
    assert llm.engine.scheduler.pool.num_free_pages == llm.engine.scheduler.num_pages


def test_plain_strings_get_the_chat_template_by_default(llm):
    assert llm.tokenizer.chat_template
    default = llm.generate(PROMPTS[0], GREEDY)[0]
    templated = llm.generate([[{"role": "user", "content": PROMPTS[0]}]], GREEDY)[0]
    raw = llm.generate(PROMPTS[0], GREEDY, chat_template=False)[0]
    assert default.outputs[0].token_ids == templated.outputs[0].token_ids
    assert default.prompt_token_ids == templated.prompt_token_ids != raw.prompt_token_ids
    assert raw.prompt_token_ids == llm.tokenizer.encode(PROMPTS[0])

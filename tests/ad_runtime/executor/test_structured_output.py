"""Structured output in the engine: outputs follow their grammar, with or without overlap, batching and preemption.

A fake paged model over a one-character-per-token vocabulary whose logits (wider than the vocabulary, as padded
models' are) favour a different token at every step, so an unconstrained answer is noise and only the mask
makes it valid.
"""

import json
import pickle
import random
import re
import string

import pytest
import torch
from ad_runtime import SamplingParams, StructuredOutputParams
from ad_runtime.executor.engine import Engine
from ad_runtime.executor.request import RequestStatus
from ad_runtime.executor.scheduler import Scheduler
from ad_runtime.kv_cache.page_pool import PagePool

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

CHARS = string.ascii_lowercase + string.digits + '{}[]":, -.'
EOS = 0
LOGITS = 64  # the model's logits: ids past the tokenizer's 47 tokens exist only as padding


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": EOS, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


class NoiseRunner:
    """A paged fake model: logits depend on the whole history, read back from its cache (placeholders resolved)."""

    def __init__(self, num_pages: int, page_size: int, device: str = "cpu"):
        self.device = torch.device(device)
        self.page_size = page_size
        self.cache = torch.full((num_pages, page_size), -1, dtype=torch.long)

    def forward(self, batch, num_prefill, future=None):
        logits = torch.empty(len(batch), LOGITS)
        for i, s in enumerate(batch):
            for j, t in enumerate(s.token_ids):
                if t < 0:
                    t = int(future[-t - 1])
                pos = s.input_pos + j
                self.cache[s.pages[pos // self.page_size], pos % self.page_size] = t
            n = s.input_pos + len(s.token_ids)
            hist = [int(self.cache[s.pages[p // self.page_size], p % self.page_size]) for p in range(n)]
            h = sum(x * (k + 1) for k, x in enumerate(hist)) * 31 + n
            logits[i] = torch.sin(torch.arange(LOGITS) * 0.37 + h)
            logits[i, LOGITS - 1] = 5.0  # padding the model likes best: never allowed under a grammar
        return logits.to(self.device)


def _engine(tokenizer, overlap=False, num_pages=64, page=4, bs=4, device="cpu"):
    pool = PagePool(num_pages, page)
    sched = Scheduler(pool, bs, 256, False, num_pages)
    runner = NoiseRunner(num_pages, page, device)
    return Engine(runner, sched, tokenizer, 512, [EOS], vocab_size=LOGITS, overlap=overlap)


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, len(CHARS) + 1) for _ in range(rng.randrange(1, 12))] for _ in range(n)]


def _run(engine, prompts, params):
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    engine.run_until_done(reqs)
    return reqs


def _clean(eng):
    assert not eng.has_unfinished and not eng.grammars.active
    assert eng.scheduler.pool.num_free_pages == eng.scheduler.num_pages


SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "tag": {"enum": ["a", "bc", "d-e"]}}, "required": ["n", "tag"]},
    {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-z]{2}[0-9]$"}}, "required": ["id"]},
]


def _constrained(spec: dict, max_tokens=120) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_output=StructuredOutputParams(**spec))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_follow_schema_regex_and_choice_where_the_noise_alone_does_not(tokenizer, device):
    """On a GPU the mask is applied to the logits there (xgrammar's kernel), from a pinned host bitmask."""
    specs = [{"json_schema": s} for s in SCHEMAS] + [
        {"regex": r"[a-c]{2,4}-[0-9]+\.[0-9]"}, {"choice": ["yes", "no", "it depends"]}]
    eng = _engine(tokenizer, device=device)
    prompts = _prompts(len(specs))
    reqs = _run(eng, prompts, [_constrained(s) for s in specs])
    for spec, r in zip(specs, reqs):
        assert r.finish_reason == "stop", (spec, r.text, r.error)
        assert EOS not in r.output_token_ids and max(r.output_token_ids) < 47
        if "json_schema" in spec:
            jsonschema.validate(json.loads(r.text), spec["json_schema"])
        elif "regex" in spec:
            assert re.fullmatch(spec["regex"], r.text), r.text
        else:
            assert r.text in spec["choice"]
    free = _run(eng, prompts, [SamplingParams(max_tokens=30, temperature=0.0)] * len(specs))
    assert all(r.output_token_ids == [LOGITS - 1] * 30 for r in free), "unconstrained, the padding token wins"
    _clean(eng)


def test_json_object_gives_an_object(tokenizer):
    eng = _engine(tokenizer)
    (r,) = _run(eng, _prompts(1, seed=2), [_constrained({"json_object": True}, max_tokens=200)])
    assert r.finish_reason == "stop" and isinstance(json.loads(r.text), dict), (r.text, r.error)
    _clean(eng)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pages", [64, 12])
def test_overlap_forced_on_gives_the_sync_tokens_for_mixed_batches(tokenizer, pages, device):
    """Constrained and free requests together, overlap on: the same tokens as without it (12 pages: preemption)."""
    prompts = _prompts(12, seed=1)
    params = [_constrained({"json_schema": SCHEMAS[i % 4]}, max_tokens=32) if i % 3 == 0
              else SamplingParams(max_tokens=4 + i, temperature=0.0, ignore_eos=True) for i in range(12)]
    sync = _run(_engine(tokenizer, num_pages=pages, device=device), prompts, params)
    eng = _engine(tokenizer, overlap=True, num_pages=pages, device=device)
    over = _run(eng, prompts, params)
    assert [(r.output_token_ids, r.finish_reason) for r in over] == [
        (r.output_token_ids, r.finish_reason) for r in sync]
    for i, r in enumerate(over):
        if i % 3 == 0:
            assert r.finish_reason == "stop", r.text
            jsonschema.validate(json.loads(r.text), SCHEMAS[i % 4])
    if pages == 12:
        assert sum(r.num_preemptions for r in over) > 0, "the small pool should force preemption"
    _clean(eng)
    # Once no constrained request runs, steps overlap again.
    _run(eng, prompts[:2], [SamplingParams(max_tokens=5, temperature=0.0)] * 2)
    eng.add_request([1, 2], SamplingParams(max_tokens=5, temperature=0.0))
    eng.step()
    assert eng._inflight is not None


def test_a_grammar_ends_the_request_even_with_ignore_eos(tokenizer):
    eng = _engine(tokenizer)
    sp = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True,
                        structured_output=StructuredOutputParams(choice=["abc"]))
    (r,) = _run(eng, [[1, 2]], [sp])
    assert (r.text, r.finish_reason, r.output_token_ids) == ("abc", "stop", [1, 2, 3])
    _clean(eng)


def test_max_tokens_cuts_a_constrained_answer_with_length(tokenizer):
    eng = _engine(tokenizer)
    (r,) = _run(eng, [[5]], [_constrained({"regex": "[a-z]{20}"}, max_tokens=5)])
    assert r.finish_reason == "length" and re.fullmatch("[a-z]{5}", r.text)
    _clean(eng)


def test_sampled_and_seeded_rows_stay_inside_the_grammar(tokenizer):
    eng = _engine(tokenizer)
    sp = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, structured_output=StructuredOutputParams(
        json_schema=SCHEMAS[1])) for s in range(4)]
    for r in _run(eng, _prompts(4), sp):
        jsonschema.validate(json.loads(r.text), SCHEMAS[1])
    _clean(eng)


def test_without_a_tokenizer_a_constrained_request_fails_alone(tokenizer):
    eng = _engine(None)
    bad = eng.add_request([1, 2], _constrained({"regex": "a+"}))
    good = eng.add_request([1, 2], SamplingParams(max_tokens=3, temperature=0.0))
    eng.run_until_done([good])
    assert bad.status == RequestStatus.FAILED and "tokenizer" in bad.error
    assert good.finish_reason == "length"
    _clean(eng)


def test_abort_releases_the_matcher(tokenizer):
    eng = _engine(tokenizer, overlap=True)
    r = eng.add_request([3], _constrained({"regex": "[a-z]{30}"}))
    eng.step()
    assert eng.grammars.active
    eng.abort(r, "caller left")
    _clean(eng)


@pytest.mark.parametrize(("kw", "words"), [
    ({"json_schema": {"type": "nope"}}, ["structured_output", "json_schema", "nope"]),
    ({"json_schema": "{not json"}, ["structured_output", "json_schema", "not valid JSON"]),
    ({"json_schema": [1]}, ["json_schema", "JSON object"]),
    ({"regex": "(ab"}, ["structured_output", "regex", "parenthesis"]),
    ({"choice": []}, ["structured_output", "choice"]),
    ({"regex": "a", "choice": ["a"]}, ["exactly one"]),
    ({}, ["exactly one"]),
    ({"json_object": True, "strict": "yes"}, ["strict"]),
])
def test_bad_constraints_are_refused_when_made_naming_the_field(kw, words):
    with pytest.raises(ValueError) as e:
        SamplingParams(structured_output=kw)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "/project/" not in str(e.value) and "\n" not in str(e.value)


def test_params_survive_pickling_to_another_rank():
    sp = SamplingParams(structured_output={"regex": "[a-z]+"})
    assert pickle.loads(pickle.dumps(sp)) == sp


def test_params_from_a_dict_and_equal_keys():
    sp = SamplingParams.from_kwargs({"structured_output": {"json_schema": '{"type": "integer"}'}})
    assert isinstance(sp.structured_output, StructuredOutputParams)
    assert sp.structured_output.key == StructuredOutputParams(json_schema={"type": "integer"}).key
    assert StructuredOutputParams(choice=["a", "b"]).kind == "choice"

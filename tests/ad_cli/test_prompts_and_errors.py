"""prompt.queries into a batch of prompts, and the one-line error report of the command-line tools."""

import logging

import pytest
from ad_cli.errors import one_line, report
from ad_cli.prompts import as_chat, display, normalize_queries

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_queries_are_repeated_or_cut_to_the_batch_size() -> None:
    assert normalize_queries(["a", "b", "c"], 2) == ["a", "b"]
    assert normalize_queries(["a", "b"], 5) == ["a", "b", "a", "b", "a"]
    assert normalize_queries("only", 3) == ["only"] * 3


def test_dict_queries_unwrap_prompt_or_messages() -> None:
    got = normalize_queries([{"prompt": "p"}, {"messages": CHAT}, CHAT], 3)
    assert got == ["p", CHAT, CHAT]


@pytest.mark.parametrize(
    ("queries", "needle"),
    [([{"text": "x"}], "prompt.queries[0]"), ([3], "prompt.queries[0]"), ([], "at least one"), (["a", []], "queries[1]")],
)
def test_bad_queries_name_the_entry(queries: list, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        normalize_queries(queries, 2)


def test_chat_template_only_for_plain_strings_when_the_tokenizer_has_one() -> None:
    assert as_chat("q", has_template=True) == [{"role": "user", "content": "q"}]
    assert as_chat("q", has_template=False) == "q"
    assert as_chat(CHAT, has_template=True) is CHAT
    assert display(CHAT) == "system: Be brief. | user: Hi"


def test_one_line_keeps_the_first_line_and_names_foreign_types() -> None:
    assert one_line(KeyError("x")) == "KeyError: 'x'"
    assert one_line(ValueError("bad\nmore detail")) == "ValueError: bad (run with --log-level debug for details)"


def test_one_line_trusts_our_package_errors() -> None:
    from ad_config import ConfigError

    assert one_line(ConfigError("args.world_size: must be positive")) == "args.world_size: must be positive"


def test_report_adds_the_traceback_only_at_debug(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    old = root.level
    try:
        err = RuntimeError("boom")
        try:
            raise err
        except RuntimeError:
            pass
        root.setLevel(logging.WARNING)
        report("prog", err)
        assert capsys.readouterr().err == "prog: error: RuntimeError: boom\n"
        root.setLevel(logging.DEBUG)
        report("prog", err)
        out = capsys.readouterr().err
        assert "Traceback" in out and out.endswith("prog: error: RuntimeError: boom\n")
    finally:
        root.setLevel(old)

"""Streaming chunks: every update with new tokens reaches the client, even while its text is held back."""

from ad_cli.engine_thread import Update
from ad_cli.openai_serving import OpenAIHandlers, _Shown


def _chunks(updates: list[Update], chat: bool = False) -> list[dict | None]:
    shown = _Shown()
    # k=None: no logprobs, so next_choice reads nothing of the handler itself
    return [OpenAIHandlers.next_choice(None, 0, shown, u, chat, None) for u in updates]


def test_a_token_whose_text_is_held_still_gets_a_chunk():
    ups = [
        Update([7], "\ufffd", False, None),  # half a character: no text yet, but a token arrived
        Update([7, 9], "é", False, None),  # the character completes
        Update([7, 9], "é", False, None),  # nothing new (a repeated snapshot): no chunk
        Update([7, 9, 4], "é!", True, "length"),
    ]
    got = _chunks(ups)
    assert [c and c["text"] for c in got] == ["", "é", None, "!"]
    assert got[0]["finish_reason"] is None and got[3]["finish_reason"] == "length"
    assert "".join(c["text"] for c in got if c) == "é!"  # the text is whole and said once


def test_chat_names_its_role_in_the_first_chunk_even_when_empty():
    got = _chunks([Update([3], "", False, None), Update([3, 5], "Hi", False, None)], chat=True)
    assert got[0]["delta"] == {"role": "assistant", "content": ""}
    assert got[1]["delta"] == {"content": "Hi"}

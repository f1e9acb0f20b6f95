"""Stop strings found from the last tokens only, cut exactly; streams hold back a possible stop string's start."""

from ad_runtime.executor.detokenizer import Detokenizer
from ad_runtime.executor.request import Request, RequestStatus
from ad_runtime.sampling_params import SamplingParams


class CharTokenizer:
    """One token per character (ids are code points); counts how many ids it decoded in all."""

    def __init__(self) -> None:
        self.decoded_ids = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_ids += len(ids)
        return "".join(map(chr, ids))


def _feed(det: Detokenizer, req: Request, text: str) -> str | None:
    for ch in text:
        req.output_token_ids.append(ord(ch))
        hit = det.update(req)
        if hit is not None:
            return hit
    return None


def test_stop_string_is_found_and_cut_exactly():
    det = Detokenizer(CharTokenizer())
    req = Request(0, [1], SamplingParams(stop=["END", "zz"]))
    assert _feed(det, req, "hello wor") is None
    assert _feed(det, req, "ld EN") is None
    assert _feed(det, req, "D and more") == "END"
    assert req.text == "hello world "
    req2 = Request(1, [1], SamplingParams(stop=["END"], include_stop_str_in_output=True))
    assert _feed(det, req2, "abcEND") == "END" and req2.text == "abcEND"


def test_each_step_decodes_a_window_not_the_whole_output():
    tok = CharTokenizer()
    det = Detokenizer(tok)
    req = Request(0, [1], SamplingParams(stop=["STOP"], max_tokens=5000))
    assert _feed(det, req, "x" * 2000) is None
    # The old check re-decoded the whole output every token (~2,000,000 ids); a window is ~12 ids a token.
    assert tok.decoded_ids <= 2000 * 12


def test_stream_text_holds_back_what_may_become_a_stop_string():
    det = Detokenizer(CharTokenizer())
    req = Request(0, [1], SamplingParams(stop=["<end>"]))
    req.output_token_ids = [ord(c) for c in "answer <en"]
    assert det.stream_text(req) == "answer "
    req.output_token_ids = [ord(c) for c in "answer <eq"]
    assert det.stream_text(req) == "answer <eq"
    req.status, req.text = RequestStatus.FINISHED, "final"
    assert det.stream_text(req) == "final"
    plain = Request(1, [1], SamplingParams())
    plain.output_token_ids = [ord(c) for c in "no stops <en"]
    assert det.stream_text(plain) == "no stops <en"

"""SequenceInfo: flattened metadata of mixed prefill / chunked prefill / decode batches."""

import pytest
import torch
from ad_runtime.attention.descriptor import METADATA_NAMES
from ad_runtime.kv_cache.sequence_info import SequenceInfo


def _info(**kw) -> SequenceInfo:
    return SequenceInfo(max_batch_size=4, max_seq_len=32, page_size=4, max_num_tokens=16, **kw)


def test_mixed_batch_metadata():
    info = _info()
    # prefill of 5 new tokens, chunked prefill of 3 after 6 cached, decode after 9 cached
    info.nest_sequences([[1, 2, 3, 4, 5], [6, 7, 8], [9]], [0, 6, 9], [[3, 0], [1, 5, 7], [2, 4, 6]])
    a = info.args()
    assert set(METADATA_NAMES) <= set(a)
    assert a["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert a["position_ids"].tolist() == [[0, 1, 2, 3, 4, 6, 7, 8, 9]]
    assert a["input_ids"].dtype == torch.int64 and a["seq_len"].dtype == torch.int32
    assert a["seq_len"].tolist() == [5, 3, 1]
    assert a["input_pos"].tolist() == [0, 6, 9]
    assert a["cu_seqlen"].tolist() == [0, 5, 8, 9]
    assert a["page_table"].tolist() == [[3, 0, -1, -1, -1, -1, -1, -1], [1, 5, 7, -1, -1, -1, -1, -1],
                                        [2, 4, 6, -1, -1, -1, -1, -1]]
    # pos 4 of seq 0 -> page 0 (second entry), offset 0; pos 6 of seq 1 -> page 5 offset 2 ...
    assert a["slot_mapping"].tolist() == [12, 13, 14, 15, 0, 22, 23, 28, 25]
    assert a["batch_indices"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2]
    assert a["cu_num_pages"].tolist() == [0, 2, 5, 8]
    assert a["page_indices"][:8].tolist() == [3, 0, 1, 5, 7, 2, 4, 6]
    assert a["last_page_len"].tolist() == [1, 1, 2]
    assert a["batch_info_host"].tolist() == [2, 8, 1]
    assert a["seq_len_host"].device.type == "cpu" and a["seq_len_host"].tolist() == [5, 3, 1]
    assert a["cu_seqlen_host"].tolist() == [0, 5, 8, 9]
    assert info.last_token_idx.tolist() == [4, 7, 8]
    assert (info.num_prefill, info.num_decode, info.num_tokens) == (2, 1, 9)


def test_buffers_are_stable_between_steps():
    info = _info()
    info.nest_sequences([[1, 2]], [0], [[0]])
    ptr = info.args()["input_ids"].data_ptr()
    info.nest_sequences([[3], [4]], [2, 5], [[0], [1, 2]])
    a = info.args()
    assert a["input_ids"].data_ptr() == ptr
    assert a["input_ids"].tolist() == [[3, 4]] and a["position_ids"].tolist() == [[2, 5]]
    assert info.is_decode_only and a["page_table"].shape == (2, 8)


def test_decode_padding_to_captured_size():
    info = _info()
    info.scratch_page = 9
    info.cuda_graph_batch_sizes = [1, 4]
    info.nest_sequences([[3], [4]], [2, 5], [[0], [1, 2]])
    assert info.num_padded_rows == 4 and info.num_sequences == 2
    assert info.args()["seq_len"].tolist() == [1, 1]  # the eager views stay unpadded
    p = info.padded_decode_args(4)
    assert p["input_ids"].tolist() == [[3, 4, 0, 0]]
    assert p["slot_mapping"].tolist() == [2, 9, 36, 36]
    assert p["page_table"][:, 0].tolist() == [0, 1, 9, 9]
    assert p["cu_seqlen"].tolist() == [0, 1, 2, 3, 4]
    assert p["batch_info_host"].tolist() == [0, 0, 4]
    # a batch with a prefill is never padded
    info.nest_sequences([[1, 2], [3]], [0, 0], [[0], [1]])
    assert info.num_padded_rows == 2


@pytest.mark.parametrize(
    "tokens, pos, pages, msg",
    [
        ([[1], [1, 2]], [0, 0], [[0], [1]], "prefills first"),
        ([[1] * 17], [0], [[0, 1, 2, 3, 4]], "max_num_tokens"),
        ([[1, 2]], [31], [[0] * 8], "max_seq_len"),
        ([[1, 2, 3, 4, 5]], [0], [[0]], "needs 2"),
        ([[]], [0], [[0]], "at least one"),
    ],
)
def test_invalid_batches(tokens, pos, pages, msg):
    with pytest.raises(ValueError, match=msg):
        _info().nest_sequences(tokens, pos, pages)


def test_page_tables_longer_than_the_step_needs():
    info = _info()
    # seq 0 holds 3 pages but its 6 tokens use 2; seq 1 holds exactly what it needs
    info.nest_sequences([[1, 2], [3]], [4, 2], [[5, 6, 7], [1]])
    a = info.args()
    assert a["page_table"][:, :4].tolist() == [[5, 6, 7, -1], [1, -1, -1, -1]]
    assert a["cu_num_pages"].tolist() == [0, 2, 3]
    assert a["page_indices"][:3].tolist() == [5, 6, 1]
    assert a["slot_mapping"].tolist() == [24, 25, 6]
    with pytest.raises(ValueError, match="has 9 pages; needs 1 \\(at most 8\\)"):
        info.nest_sequences([[1]], [0], [list(range(9))])


@pytest.mark.parametrize("graph_sizes", [[], [2, 4]])  # [2, 4]: the row is padded to 2 (CUDA graphs)
@pytest.mark.parametrize("token, pos, pages, slot", [
    (7, 0, [3], None),  # first token of a page
    (-1, 5, [2, 9], 1),  # a placeholder id (overlap), second page, a state slot
    (11, 7, [4, 6, 8], 2),  # last slot of page 1 of 3 held
    (5, 31, [0, 1, 2, 3, 4, 5, 6, 7], None),  # the last position max_seq_len allows
])
def test_lone_decode_fills_what_the_general_path_fills(graph_sizes, token, pos, pages, slot):
    fast, ref = _info(), _info()
    for info in (fast, ref):
        info.scratch_page, info.cuda_graph_batch_sizes = 15, graph_sizes
        info.nest_sequences([[1, 2, 3], [4]], [0, 2], [[0], [1]])  # leave other values in the buffers first
    slots = None if slot is None else [slot]
    fast.nest_sequences([[token]], [pos], [pages], slots)  # the scalar path
    ref._nest_many([[token]], [pos], [pages], slots)  # the numpy path every batch of more takes
    for side in ("_small", "_large"):
        a, b = getattr(fast, side), getattr(ref, side)
        assert torch.equal(a.host, b.host) and torch.equal(a.dev, b.dev), side
    assert fast.batch_info_host.tolist() == ref.batch_info_host.tolist() == [0, 0, 1]
    assert (fast.num_sequences, fast.num_tokens, fast.num_padded_rows) == (ref.num_sequences, ref.num_tokens,
                                                                             ref.num_padded_rows)
    assert fast.num_padded_rows == (1 if not graph_sizes else 2)


@pytest.mark.parametrize("pos, pages, msg", [
    (32, [0] * 8, "max_seq_len"),
    (4, [0], "has 1 pages; needs 2"),
    (0, list(range(9)), "has 9 pages; needs 1 \\(at most 8\\)"),
])
def test_lone_decode_refuses_what_the_general_path_refuses(pos, pages, msg):
    with pytest.raises(ValueError, match=msg):
        _info().nest_sequences([[1]], [pos], [pages])
    with pytest.raises(ValueError, match=msg):
        _info()._nest_many([[1]], [pos], [pages], None)


def test_views_are_made_once_per_shape_and_read_the_current_step():
    info = _info()
    info.nest_sequences([[1, 2], [3]], [0, 4], [[0], [1, 2]])
    first = info.args()
    first["input_ids"] = None  # the caller's dict: the next call is not affected
    info.nest_sequences([[7, 8], [9]], [0, 5], [[3], [1, 2]])
    again = info.args()
    assert again["input_ids"] is not None and again["input_ids"].tolist() == [[7, 8, 9]]
    assert again["position_ids"].tolist() == [[0, 1, 5]] and again["seq_len_host"].tolist() == [2, 1]
    assert again["page_table"] is info.args()["page_table"]  # one view per shape, reused
    info.nest_sequences([[4]], [2], [[6]])
    assert info.args()["input_ids"].shape == (1, 1) and info.args()["page_table"].shape == (1, info.max_pages_per_seq)


def test_steps_of_few_tokens_use_the_small_buffers_and_longer_ones_the_large():
    info = _info()  # max_batch_size 4, max_num_tokens 16: steps of up to 4 tokens use the small buffers
    assert info._small.dev.numel() < info._large.dev.numel()
    info.nest_sequences([[1, 2, 3, 4, 5]], [0], [[0, 1]])
    big = info.args()
    assert big["input_ids"].data_ptr() == info._large.dev.data_ptr()
    assert big["input_ids"].tolist() == [[1, 2, 3, 4, 5]] and info.last_token_idx.tolist() == [4]
    info.nest_sequences([[-1]], [5], [[0, 1]])  # a decode, its token still on the device (overlap)
    info.resolve_future_tokens(torch.tensor([6]))
    one = info.args()
    # the address CUDA graphs capture is the one a real decode step fills
    assert one["input_ids"].data_ptr() == info._small.dev.data_ptr() == info.padded_decode_args(1)["input_ids"].data_ptr()
    assert one["input_ids"].tolist() == [[6]] and one["position_ids"].tolist() == [[5]]
    assert one["slot_mapping"].tolist() == [5] and one["page_table"].tolist() == [[0, 1] + [-1] * 6]
    info.nest_sequences([[7, 8], [9]], [6, 0], [[0, 1], [2]])  # a mixed step of 3 tokens: small too
    mixed = info.args()
    assert mixed["input_ids"].tolist() == [[7, 8, 9]] and mixed["batch_indices"].tolist() == [0, 0, 1]
    assert mixed["cu_seqlen"].tolist() == [0, 2, 3] and info.last_token_idx.tolist() == [1, 2]


@pytest.mark.parametrize("lengths", [[1, 1, 1], [5, 1]])
def test_dummy_columns_stay_on_the_scratch_page_and_the_scratch_state_row(lengths):
    # What the decode-graph and piecewise captures run: every sequence needs a state row, and the scratch one
    # (max_batch_size) is the only one no request owns (slot -1 once failed every state model's GPU capture).
    info = _info()
    info.scratch_page = 9
    info.nest_sequences(*info.dummy_columns(lengths))
    a = info.args()
    b = len(lengths)
    assert a["slot_idx"][:b].tolist() == [4] * b
    assert set(a["page_table"][:b].flatten().tolist()) <= {9, -1}
    assert a["input_pos"][:b].tolist() == [0] * b and a["seq_len"][:b].tolist() == lengths

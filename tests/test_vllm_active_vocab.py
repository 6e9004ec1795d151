"""The vLLM plugin's per-request active vocabularies (vllm_plugin/nanospec_vllm/active_vocab.py), without vLLM:
the buffer math that decides which ids each draft row may score."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vllm_plugin"))
from nanospec_vllm.active_vocab import ActiveVocab  # noqa: E402

V, H = 50, 8


@pytest.fixture
def weight():
    return torch.randn(V, H, generator=torch.Generator().manual_seed(0))


def full_logits(weight):
    return lambda hidden: hidden @ weight.T


def allowed(logits):
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


def test_each_row_scores_exactly_its_own_request_and_the_core(weight):
    vocab = ActiveVocab(weight, V, slots=4, core_ids=[0, 1], capacity=16, buffer_capacity=32)
    vocab.absorb("a", [5, 3, 5])
    vocab.absorb("b", [7])
    hidden = torch.randn(2, H)
    logits = vocab.logits(hidden, ["a", "b"], full_logits(weight))
    assert logits.shape == (2, V)
    assert allowed(logits) == [{0, 1, 3, 5}, {0, 1, 7}]
    exact = hidden @ weight.T  # the values the full head gives, at the allowed ids
    for row, ids in enumerate(allowed(logits)):
        assert torch.allclose(logits[row, sorted(ids)], exact[row, sorted(ids)], atol=1e-5)
    assert vocab.stats.scored_sum == 5  # the union {0, 1, 5, 3, 7}, not V rows


def test_rows_are_gathered_once_and_grow_incrementally(weight):
    vocab = ActiveVocab(weight, V, slots=2, core_ids=[0], capacity=16, buffer_capacity=32)
    vocab.absorb("a", [4, 9])
    vocab.absorb("b", [9, 11])
    assert vocab.pending_ids == [4, 9, 11]  # decided on the host; one gather at the flush
    vocab.flush()
    assert vocab.used == 4 and vocab.buffer_ids[:4].tolist() == [0, 4, 9, 11] and not vocab.pending_ids
    assert torch.equal(vocab.buffer_rows[:4], weight[[0, 4, 9, 11]])
    vocab.absorb("a", [11])  # already in the buffer: only a's membership changes
    assert vocab.used == 4 and vocab.active["a"] == {0, 4, 9, 11}


def test_finished_requests_free_their_slot_and_a_full_buffer_is_compacted(weight):
    vocab = ActiveVocab(weight, V, slots=2, core_ids=[0], capacity=8, buffer_capacity=8)
    vocab.absorb("a", [1, 2, 3, 4, 5, 6])
    vocab.release("a")
    vocab.absorb("b", [10, 11, 12])  # 7 + 3 > 8 entries: rebuilt from the live request and the core
    assert vocab.stats.rebuilds == 1 and vocab.used == 4
    assert allowed(vocab.logits(torch.randn(1, H), ["b"], full_logits(weight))) == [{0, 10, 11, 12}]
    vocab.absorb("c", [1])  # b's slot and a new one: two live requests in two slots
    assert vocab.slot_of["b"] != vocab.slot_of["c"]


def test_a_request_over_capacity_falls_back_to_the_full_vocabulary(weight):
    vocab = ActiveVocab(weight, V, slots=2, core_ids=[0], capacity=4, buffer_capacity=16)
    vocab.absorb("a", [1, 2])
    vocab.absorb("big", [3, 4, 5, 6, 7])
    hidden = torch.randn(2, H)
    logits = vocab.logits(hidden, ["a", "big"], full_logits(weight))
    assert allowed(logits) == [{0, 1, 2}, set(range(V))]
    assert torch.allclose(logits[1], hidden[1] @ weight.T)
    assert vocab.stats.full_rows == 1 and vocab.contains("big", 49)


def test_a_pruned_draft_vocabulary_maps_target_ids_to_draft_rows(weight):
    draft_rows = weight[:10]  # draft row d scores target id 2 * d (an EAGLE-3 d2t map)
    draft_index = torch.full((V,), -1, dtype=torch.long)
    draft_index[torch.arange(10) * 2] = torch.arange(10)
    vocab = ActiveVocab(draft_rows, V, slots=1, core_ids=[0, 1], capacity=8, buffer_capacity=8,
                        draft_index=draft_index)
    vocab.absorb("a", [4, 5, 6])  # 1 and 5 cannot be drafted: skipped
    hidden = torch.randn(1, H)
    logits = vocab.logits(hidden, ["a"], full_logits(weight))
    assert allowed(logits) == [{0, 4, 6}]
    assert torch.allclose(logits[0, 6], hidden[0] @ draft_rows[3], atol=1e-5)


def test_more_live_requests_than_slots_is_a_clear_error(weight):
    vocab = ActiveVocab(weight, V, slots=1, core_ids=[], capacity=4, buffer_capacity=8)
    vocab.absorb("a", [1])
    with pytest.raises(RuntimeError, match="slots"):
        vocab.absorb("b", [2])

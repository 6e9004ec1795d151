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
    assert torch.allclose(logits[1], hidden[1] @ weight.T, atol=1e-5)  # one product vs a batched one: rounding
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


# ----- bounds: a rebuild, finished requests, empty sets (issue 24, defects 7-9) -----
def test_a_rebuild_counts_each_new_id_once(weight):
    """The ids that trigger a compaction are counted once against the buffer: after the rebuild they fit (6 of 8
    entries), so the request keeps its restricted set instead of falling back to the full vocabulary."""
    vocab = ActiveVocab(weight, V, slots=2, core_ids=[0], capacity=8, buffer_capacity=8)
    vocab.absorb("a", [1, 2, 3, 4, 5, 6])
    vocab.release("a")
    vocab.absorb("b", [10, 11, 12, 13, 14])  # 7 + 5 > 8: rebuilt to core + b = 6 entries
    assert vocab.stats.rebuilds == 1 and vocab.used == 6
    logits = vocab.logits(torch.randn(1, H), ["b"], full_logits(weight))
    assert allowed(logits) == [{0, 10, 11, 12, 13, 14}]
    assert vocab.stats.full_rows == 0


def test_the_counters_stay_a_few_numbers_however_many_requests_finish(weight):
    import pickle

    vocab = ActiveVocab(weight, V, slots=2, core_ids=[0], capacity=8, buffer_capacity=16)

    def serve(requests):
        for k in range(requests):
            vocab.absorb(f"r{k}", [10 + k % 7, 20 + k % 5])
            vocab.release(f"r{k}")
        return len(pickle.dumps(vocab.stats))

    small = serve(10)
    assert serve(5000) <= small + 16  # a long-running server: no per-request list in the stats
    assert vocab.stats.to_json()["avg_final_active"] == pytest.approx(3.0)


def test_an_empty_set_never_drafts_outside_it_nor_gives_nan(weight):
    """No static core and a prompt the pruned head cannot draft: the set is empty. That row is not restricted at all
    (the full vocabulary), never a row of -inf (NaN softmax, greedy id 0)."""
    draft_index = torch.full((V,), -1, dtype=torch.long)
    draft_index[torch.arange(10) * 2 + 20] = torch.arange(10)  # draftable: 20, 22, ..., 38
    vocab = ActiveVocab(weight[:10], V, slots=2, core_ids=[], capacity=8, buffer_capacity=8, draft_index=draft_index)
    vocab.absorb("a", [3, 5, 7])  # nothing draftable
    vocab.absorb("b", [22, 24])
    logits = vocab.logits(torch.randn(2, H), ["a", "b"], lambda h: restricted_full(h, weight[:10], draft_index))
    q = torch.softmax(logits, dim=-1)
    assert not torch.isnan(q).any() and torch.allclose(q.sum(-1), torch.ones(2))
    greedy = logits.argmax(-1).tolist()
    assert vocab.contains("a", greedy[0]) and draft_index[greedy[0]] >= 0
    assert allowed(logits)[1] == {22, 24}


def restricted_full(hidden, rows, draft_index):
    """What vLLM's compute_logits returns for a pruned head: the draftable ids' logits, -inf elsewhere."""
    out = torch.full((hidden.shape[0], V), float("-inf"))
    ids = draft_index.ge(0).nonzero().flatten()
    out[:, ids] = hidden @ rows[draft_index[ids]].T
    return out


def test_the_draft_positions_of_a_step_upload_nothing(weight, monkeypatch):
    """A host list turned into a device tensor is a blocking copy on CUDA: the step's writes and its row map go up
    once (the first call here, the runner hook in the engine), never once per draft position."""
    vocab = ActiveVocab(weight, V, slots=4, core_ids=[0, 1], capacity=16, buffer_capacity=32)
    vocab.absorb("a", [5, 3])
    vocab.absorb("b", [7])
    hidden = torch.randn(2, H)
    first = vocab.logits(hidden, ["a", "b"], full_logits(weight))

    def no_upload(*args, **kwargs):
        raise AssertionError("a host-to-device tensor built inside a draft position")

    monkeypatch.setattr(torch, "tensor", no_upload)
    for _ in range(3):  # the step's next draft positions
        assert torch.equal(vocab.logits(hidden, ["a", "b"], full_logits(weight)), first)


# ----- what was scored, against sets recomputed outside the plugin -----
def test_q_is_zero_outside_the_set_and_sums_to_one(weight):
    vocab = ActiveVocab(weight, V, slots=2, core_ids=[0, 1], capacity=16, buffer_capacity=32)
    vocab.absorb("a", [5, 3, 9])
    vocab.absorb("b", [40, 41])
    hidden = torch.randn(2, H)
    for temperature in (1.0, 0.7):
        q = torch.softmax(vocab.logits(hidden, ["a", "b"], full_logits(weight)) / temperature, dim=-1)
        assert torch.allclose(q.sum(-1), torch.ones(2))
        for row, expected in enumerate(({0, 1, 3, 5, 9}, {0, 1, 40, 41})):
            outside = [i for i in range(V) if i not in expected]
            assert q[row, outside].abs().max() == 0
            exact = torch.softmax((hidden[row] @ weight[sorted(expected)].T) / temperature, dim=-1)
            assert torch.allclose(q[row, sorted(expected)], exact, atol=1e-6)  # p restricted and renormalised


def test_requests_joining_and_leaving_are_scored_against_their_own_history():
    """A random run of joins, commits, leaves and rebuilds (a small buffer), with disjoint vocabularies per request:
    each row's finite logits are exactly the ids recomputed from that request's own history, at the full head's
    values. A row scored with another request's set, or a stale one, fails."""
    import random

    vocab_size, hidden_size = 400, 8
    weight = torch.randn(vocab_size, hidden_size, generator=torch.Generator().manual_seed(1))
    core = [0, 1, 2]
    vocab = ActiveVocab(weight, vocab_size, slots=3, core_ids=core, capacity=40, buffer_capacity=64)
    rng = random.Random(0)
    history: dict[str, list[int]] = {}
    next_request = 0
    for step in range(60):
        if len(history) < 3 and rng.random() < 0.6:  # a request joins with a prompt from its own id range
            name, next_request = f"r{next_request}", next_request + 1
            base = 10 + 30 * (int(name[1:]) % 13)
            history[name] = [base + rng.randrange(30) for _ in range(rng.randint(1, 6))]
            vocab.absorb(name, history[name])
        for name in history:  # each live request commits a few ids of its range
            base = 10 + 30 * (int(name[1:]) % 13)
            new = [base + rng.randrange(30) for _ in range(rng.randint(0, 2))]
            history[name] += new
            vocab.absorb(name, new)
        if history and rng.random() < 0.25:  # one leaves
            gone = rng.choice(sorted(history))
            vocab.release(gone)
            del history[gone]
        if not history:
            continue
        requests = sorted(history, key=lambda _: rng.random())  # any row order
        hidden = torch.randn(len(requests), hidden_size)
        logits = vocab.logits(hidden, requests, lambda h: h @ weight.T)
        for row, name in enumerate(requests):
            expected = set(core) | set(history[name])
            assert allowed(logits[row:row + 1]) == [expected], (step, name)
            ids = sorted(expected)
            assert torch.allclose(logits[row, ids], hidden[row] @ weight[ids].T, atol=1e-5)
    assert vocab.stats.rebuilds > 0 and vocab.stats.full_rows == 0  # the buffer was compacted along the way


# ----- issue 35, defect 4: no re-gather cliff near capacity -----
def test_an_overflow_that_compaction_cannot_relieve_does_not_rebuild(weight):
    """Near capacity with nothing finished, a rebuild frees nothing: it must not re-gather every live row each time
    a request overflows (the request falls back instead, as it would after the rebuild)."""
    vocab = ActiveVocab(weight, V, slots=6, core_ids=[0], capacity=20, buffer_capacity=24)
    vocab.absorb("a", range(1, 16))
    vocab.absorb("b", range(16, 24))  # 24 entries, all live
    for k, request in enumerate(("c", "d", "e")):  # each step another request brings one new id
        vocab.absorb(request, [30 + k])
    assert vocab.stats.rebuilds == 0 and vocab.full_slots == {vocab.slot_of[r] for r in "cde"}


def test_a_rebuild_waits_for_enough_finished_rows_and_leaves_headroom(weight):
    """A rebuild is worth its re-gather only when it frees room for more than the ids that asked for it: with one
    finished row it waits; once an eighth of the buffer is dead it compacts, and the next steps' ids fit."""
    vocab = ActiveVocab(weight, V, slots=8, core_ids=[0], capacity=40, buffer_capacity=40)
    vocab.absorb("a", range(1, 36))  # 36 entries
    vocab.absorb("x", [36])
    vocab.release("x")  # one dead entry: 37 used
    vocab.absorb("b", [37, 38, 39, 40])  # 41 > 40: compaction would leave 40 of 40 used
    assert vocab.stats.rebuilds == 0
    vocab.release("a")  # 36 dead entries
    vocab.absorb("c", range(41, 46))  # 37 + 5 > 40: compacted to core + c
    assert vocab.stats.rebuilds == 1 and vocab.used <= 40 - 40 // 8
    for k in range(3):
        vocab.absorb("c", [46 + k])
    assert vocab.stats.rebuilds == 1
    logits = vocab.logits(torch.randn(1, H), ["c"], full_logits(weight))
    assert allowed(logits) == [{0, *range(41, 49)}]

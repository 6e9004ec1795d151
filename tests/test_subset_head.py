"""SubsetLMHead: the device-resident active set behind NanoSpec's and FR-Spec's restricted lm head."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanospec_core.bench.microbench import microbench
from nanospec_core.vocab.subset_head import SubsetLMHead, full_topk, resolve_buffer_dtype

V, H = 5000, 64


@pytest.fixture(scope="module")
def weight():
    return torch.randn(V, H, generator=torch.Generator().manual_seed(0))


def active_ids(head):
    return torch.nonzero(head.mask).reshape(-1)


def test_add_deduplicates_and_gathers_only_new_rows(weight):
    head = SubsetLMHead(weight, capacity=16)
    assert head.add(torch.tensor([5, 9, 5, 9, 2])) == 3
    assert head.slot_ids[:3].tolist() == [5, 9, 2]  # first occurrences, in order
    assert head.add(torch.tensor([9, 2, 11])) == 1  # only 11 is new
    assert head.size == 4 and head.slot_of[11].item() == 3
    assert len(head._pending) == 2 and head._pending[1][0].tolist() == [3]  # incremental: one row queued
    head.check_invariants()  # gathers, then compares the buffer with the weight


def test_ids_outside_range_or_head_vocabulary_are_ignored(weight):
    row_of_id = torch.full((V,), -1, dtype=torch.long)
    row_of_id[:100] = torch.arange(100, 200)  # a head that can only draft target ids 0..99, stored in rows 100..199
    head = SubsetLMHead(weight, capacity=8, vocab_size=V, row_of_id=row_of_id)
    assert head.add(torch.tensor([3, 150, -1, V + 7, 99])) == 2
    assert active_ids(head).tolist() == [3, 99]
    head.gather()
    assert torch.equal(head.buffer[head.slot_of[3]], weight[103])
    assert head.contains(torch.tensor([3, 150, -1, V + 7])).tolist() == [True, False, False, False]
    head.check_invariants()


def test_subset_logits_equal_full_logits_at_active_ids(weight):
    head = SubsetLMHead(weight, capacity=64)
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:50]
    head.add(ids)
    hidden = torch.randn(4, H)
    subset = head.logits(hidden)  # [4, used]
    full = hidden @ weight.T  # [4, V]
    torch.testing.assert_close(subset, full[:, head.slot_ids[: head.used]])


def test_topk_maps_back_to_real_ids_and_renormalises_over_the_active_set(weight):
    head = SubsetLMHead(weight, capacity=300)
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(2))[:300]
    head.add(ids)
    hidden = torch.randn(5, H)
    logp, top_ids = head.topk(hidden, 8)
    restricted = torch.full((5, V), float("-inf"))
    restricted[:, ids] = (hidden @ weight.T)[:, ids]
    expected_logp, expected_ids = torch.topk(torch.log_softmax(restricted, dim=-1), 8)
    assert torch.equal(top_ids, expected_ids)
    torch.testing.assert_close(logp, expected_logp)
    assert logp.dtype == torch.float32


def test_topk_pads_with_minus_inf_when_k_exceeds_the_active_set(weight):
    head = SubsetLMHead(weight, capacity=8)
    head.add(torch.tensor([10, 20, 30]))
    logp, ids = head.topk(torch.randn(2, H), 5)
    assert logp.shape == ids.shape == (2, 5)
    assert torch.isinf(logp[:, 3:]).all() and torch.isfinite(logp[:, :3]).all()
    assert sorted(ids[0, :3].tolist()) == [10, 20, 30]
    empty = SubsetLMHead(weight, capacity=8)
    logp, ids = empty.topk(torch.randn(2, H), 3)
    assert logp.shape == (2, 3) and torch.isinf(logp).all()


def test_lru_evicts_the_least_recently_seen_ids(weight):
    head = SubsetLMHead(weight, capacity=4)
    for token in (100, 101, 102, 103):  # one per round: stamps 1, 2, 3, 4
        head.tick()
        head.add(torch.tensor([token]))
    head.tick()
    head.touch(torch.tensor([100]))  # 100 seen again: now the most recent
    head.add(torch.tensor([104, 105]))  # overflow by two -> evict 101 and 102
    assert sorted(active_ids(head).tolist()) == [100, 103, 104, 105]
    head.check_invariants()


def test_pinned_ids_are_never_evicted(weight):
    head = SubsetLMHead(weight, capacity=4)
    head.add(torch.tensor([1, 2]), pinned=True)
    for round_ in range(5):
        head.tick()
        head.add(torch.tensor([1000 + 2 * round_, 1001 + 2 * round_]))
        assert {1, 2} <= set(active_ids(head).tolist())
    with pytest.raises(ValueError):
        head.evict(3)  # only two unpinned ids are active
    with pytest.raises(ValueError):
        head.add(torch.tensor([7, 8, 9]), pinned=True)  # 5 pinned ids cannot fit 4 slots
    head.check_invariants()


def test_a_batch_larger_than_the_capacity_keeps_its_last_ids(weight):
    head = SubsetLMHead(weight, capacity=3)
    head.add(torch.arange(10, 20))
    assert sorted(active_ids(head).tolist()) == [17, 18, 19]
    head.check_invariants()


def test_an_overflowing_batch_ranks_a_repeated_id_by_its_last_occurrence(weight):
    # Found by hypothesis: id 0 drafted first and committed last must survive like the other committed ids.
    head = SubsetLMHead(weight, capacity=3)
    head.add(torch.tensor([0, 11, 12, 13, 14, 0]), tags=torch.tensor([5, 1, 1, 1, 1, 2]))
    assert sorted(active_ids(head).tolist()) == [0, 13, 14]
    assert head.tag_of(torch.tensor([0]))[0].tolist() == [5]  # the first occurrence's tag
    head.check_invariants()


def test_an_overflowing_batch_keeps_a_new_last_id_over_present_earlier_ones(weight):
    # Found by hypothesis (policy level): present node-top-k ids fill the capacity, then a committed id that is
    # new arrives last in the same batch; it must be kept and an earlier present id make room for it.
    head = SubsetLMHead(weight, capacity=4)
    head.add(torch.tensor([7]), pinned=True)
    head.add(torch.tensor([1, 2, 3]))
    head.tick()
    head.add(torch.tensor([1, 2, 3, 0]))  # 1, 2, 3 present (earlier in the batch), 0 new and last
    assert sorted(active_ids(head).tolist()) == [0, 2, 3, 7]
    head.check_invariants()


def test_evicted_slots_score_minus_inf_and_are_reused_first(weight):
    head = SubsetLMHead(weight, capacity=8)
    head.add(torch.arange(6))
    head.tick()
    head.touch(torch.arange(2, 6))
    freed = head.evict(2)  # ids 0 and 1
    assert sorted(head.slot_ids[freed].tolist()) == [-1, -1]
    logits = head.logits(torch.randn(3, H))
    assert logits.shape == (3, 6) and torch.isinf(logits[:, freed]).all()
    head.add(torch.tensor([40, 41]))
    assert head.used == 6 and head.holes == 0  # holes refilled, no fresh slot used
    head.check_invariants()


def test_reset_empties_the_set(weight):
    head = SubsetLMHead(weight, capacity=8)
    head.add(torch.arange(5), pinned=True)
    head.reset()
    assert head.size == 0 and head.num_pinned == 0 and not head.mask.any()
    head.check_invariants()


def test_float32_buffer_from_bf16_weight_matches_the_upcast_rows(weight):
    w16 = weight.bfloat16()
    head = SubsetLMHead(w16, capacity=16, buffer_dtype=torch.float32)
    head.add(torch.arange(16))
    hidden = torch.randn(2, H)
    torch.testing.assert_close(head.logits(hidden), hidden @ w16[:16].float().T)
    head.check_invariants()
    assert resolve_buffer_dtype("auto", w16) == torch.bfloat16  # the weight's: the probe chose that dtype
    assert resolve_buffer_dtype("weight", w16) == torch.bfloat16
    assert resolve_buffer_dtype("auto", weight) == torch.float32


def test_full_topk_maps_head_rows_to_target_ids(weight):
    head_to_target = torch.randperm(2 * V, generator=torch.Generator().manual_seed(3))[:V]
    hidden = torch.randn(2, H)
    logp, ids = full_topk(weight, hidden, 4, head_to_target)
    expected_logp, rows = torch.topk(torch.log_softmax(hidden @ weight.T, -1), 4)
    assert torch.equal(ids, head_to_target[rows])
    torch.testing.assert_close(logp, expected_logp)


def test_microbench_reports_one_row_per_size():
    rows = microbench(sizes=(16, 32), H=32, V=500, m=2, dtype=torch.float32, repeats=2)
    assert [size for size, _, _ in rows] == [16, 32]
    assert all(subset_ms > 0 and full_ms > 0 for _, subset_ms, full_ms in rows)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(-3, 300), max_size=40), st.booleans()),
        st.tuples(st.just("touch"), st.lists(st.integers(0, 300), max_size=10)),
        st.tuples(st.just("evict"), st.integers(0, 10)),
        st.tuples(st.just("tick")),
        st.tuples(st.just("gather")),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(ops=operations, capacity=st.integers(4, 48))
def test_invariants_hold_under_random_operations(weight, ops, capacity):
    # Ids come from [0, 300) of a 5000-id vocabulary, some not in the head's vocabulary (every 7th).
    row_of_id = torch.arange(V)
    row_of_id[::7] = -1
    head = SubsetLMHead(weight, capacity=capacity, vocab_size=V, row_of_id=row_of_id)
    for op in ops:
        pinned_before = set(torch.nonzero(head.pinned).reshape(-1).tolist())
        before = set(active_ids(head).tolist())
        stamps = head.last_seen.clone()
        if op[0] == "add":
            ids, pinned = torch.tensor(op[1], dtype=torch.long), op[2]
            try:
                head.add(ids, pinned=pinned)
            except ValueError:
                assert pinned  # only pinning more ids than fit is refused
                continue
        elif op[0] == "touch":
            head.touch(torch.tensor(op[1], dtype=torch.long))
        elif op[0] == "evict":
            n = min(op[1], head.size - head.num_pinned)
            head.evict(n)
            after = set(active_ids(head).tolist())
            evicted = before - after
            assert len(evicted) == n and not evicted & pinned_before
            survivors = after - pinned_before
            if evicted and survivors:  # LRU: nothing evicted is more recent than any unpinned survivor
                assert max(stamps[list(evicted)].tolist()) <= min(stamps[list(survivors)].tolist())
        elif op[0] == "tick":
            head.tick()
        else:
            head.gather()
        after = set(active_ids(head).tolist())
        assert pinned_before <= after  # pinned ids are never evicted
        assert len(after) == head.size <= capacity
        head.check_invariants()

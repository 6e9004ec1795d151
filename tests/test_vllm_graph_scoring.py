"""The vLLM plugin's Model Runner V2 form of the restricted draft head (vllm_plugin/nanospec_vllm: scoring.score_fixed,
ActiveVocab(fixed=True)), without vLLM or a GPU: V2 records the speculator's draft step as one FULL CUDA graph, so the
head must score the same shapes with the same operations for any batch, read nothing back from the device, and keep
its buffers where the graph saw them. Plus the tensor-parallel row gather (rows.HeadRows)."""
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vllm_plugin"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vllm_plugin" / "tests"))
from lockstep import LockstepAllReduce  # noqa: E402
from nanospec_vllm.active_vocab import ActiveVocab  # noqa: E402
from nanospec_vllm.rows import HeadRows  # noqa: E402
from nanospec_vllm.scoring import LogitTransform  # noqa: E402

V, H, SLOTS = 64, 8, 4


@pytest.fixture
def weight():
    return torch.randn(V, H, generator=torch.Generator().manual_seed(0))


def finite(logits):
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


def slots(*values):
    return torch.tensor(values, dtype=torch.long)


def test_the_fixed_form_scores_what_the_eager_form_scores(weight):
    eager = ActiveVocab(weight, V, slots=SLOTS, core_ids=[0, 1], capacity=16, buffer_capacity=32)
    fixed = ActiveVocab(weight, V, slots=SLOTS, core_ids=[0, 1], capacity=16, buffer_capacity=32, fixed=True)
    for vocab in (eager, fixed):
        vocab.admit("a", [5, 3, 9], slot=2)  # V2 passes its request-state index as the slot
        vocab.admit("b", [40], slot=0)
        vocab.flush()
    hidden = torch.randn(2, H)
    transform = LogitTransform(scale=0.5, soft_cap=3.0)
    want = eager.logits(hidden, ["a", "b"], lambda h: h @ weight.T, transform)
    got = fixed.graph_logits(hidden, slots(2, 0), transform)
    assert finite(got) == [{0, 1, 3, 5, 9}, {0, 1, 40}]
    assert torch.allclose(got, want, atol=1e-6)
    exact = transform(hidden @ weight.T)  # vLLM's LogitsProcessor: soft cap, then scale
    assert torch.allclose(got[0, [0, 1, 3, 5, 9]], exact[0, [0, 1, 3, 5, 9]], atol=1e-6)


def test_padded_rows_and_empty_sets_score_the_reserved_set(weight):
    """A graph replays for a padded batch (index -1) and may meet a request with nothing to restrict to: such rows
    score the reserved set (the core), never a row of -inf (NaN softmax, greedy id 0 outside any set)."""
    draft_index = torch.full((V,), -1, dtype=torch.long)
    draft_index[torch.arange(8) + 30] = torch.arange(8)  # the pruned head drafts 30..37 only
    vocab = ActiveVocab(weight[:8], V, slots=SLOTS, core_ids=[], capacity=8, buffer_capacity=8,
                        draft_index=draft_index, fixed=True)
    vocab.admit("empty", [1, 2, 3], slot=1)  # nothing draftable, no core
    vocab.admit("b", [31, 33], slot=3)
    vocab.flush()
    logits = vocab.graph_logits(torch.randn(3, H), slots(1, 3, -1))
    assert finite(logits) == [{30}, {31, 33}, {30}]  # the reserved set: the first draftable id
    assert not torch.isnan(torch.softmax(logits, -1)).any()
    assert vocab.contains("empty", 30) and not vocab.contains("empty", 31)
    vocab.read_counters()
    assert (vocab.stats.steps, vocab.stats.rows, vocab.stats.fallback_rows, vocab.stats.active_sum) == (1, 1, 1, 2)


class OpTrace(TorchDispatchMode):
    """Every aten op run, with its output shapes: what a CUDA graph would record."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                  if isinstance(t, torch.Tensor)]
        self.ops.append((str(func.overloadpacket), shapes))
        return out


def test_one_captured_graph_fits_any_batch(weight):
    """Two batches with different sets, buffer use and slots run the same ops on the same shapes, and none of them
    reads the device (item, nonzero, masked_select, unique: a host sync, illegal while capturing)."""
    vocab = ActiveVocab(weight, V, slots=SLOTS, core_ids=[0], capacity=24, buffer_capacity=32, fixed=True)
    vocab.admit("a", [5, 3], slot=0)
    vocab.flush()
    hidden = torch.randn(3, H)
    with OpTrace() as first:
        vocab.graph_logits(hidden, slots(0, -1, -1))
    vocab.admit("b", list(range(10, 26)), slot=2)
    vocab.absorb("a", [7, 8, 9])
    vocab.flush()
    with OpTrace() as second:
        out = vocab.graph_logits(hidden, slots(2, 0, -1))
    assert first.ops == second.ops
    syncing = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
               "aten.item", "aten.equal", "aten.is_nonzero"}
    assert not syncing & {name for name, _ in second.ops}
    assert finite(out)[:2] == [{0, *range(10, 26)}, {0, 3, 5, 7, 8, 9}]


def test_the_buffers_stay_where_the_graph_saw_them(weight):
    vocab = ActiveVocab(weight, V, slots=2, core_ids=[0], capacity=16, buffer_capacity=16, fixed=True)
    tensors = (vocab.buffer_ids, vocab.buffer_rows, vocab.member, vocab.slot_live, vocab.counters)
    where = [t.data_ptr() for t in tensors]
    vocab.admit("a", list(range(1, 12)), slot=0)
    vocab.release("a")
    vocab.admit("b", list(range(20, 30)), slot=1)  # 12 + 10 > 16: a rebuild
    weight.mul_(2)
    vocab.reload_rows()
    vocab.flush()
    assert vocab.stats.rebuilds == 1
    assert [t.data_ptr() for t in (vocab.buffer_ids, vocab.buffer_rows, vocab.member, vocab.slot_live,
                                   vocab.counters)] == where
    hidden = torch.randn(1, H)
    logits = vocab.graph_logits(hidden, slots(1))
    assert torch.allclose(logits[0, 20:30], hidden[0] @ weight[20:30].T, atol=1e-5)  # the reloaded weights


def test_past_its_capacity_a_v2_set_stops_growing_instead_of_falling_back(weight):
    vocab = ActiveVocab(weight, V, slots=2, core_ids=[0], capacity=4, buffer_capacity=16, fixed=True)
    vocab.admit("a", [1, 2], slot=0)
    vocab.absorb("a", [3, 4, 5])  # 3 + 3 > 4: keeps what fits
    vocab.flush()
    assert vocab.active["a"] == {0, 1, 2, 3} and vocab.stats.capped_requests == 1
    assert finite(vocab.graph_logits(torch.randn(1, H), slots(0))) == [{0, 1, 2, 3}]
    assert vocab.stats.full_rows == 0


def test_the_device_counters_count_every_call_with_a_live_row(weight):
    vocab = ActiveVocab(weight, V, slots=2, core_ids=[0], capacity=8, buffer_capacity=16, fixed=True)
    vocab.admit("a", [1, 2], slot=1)
    vocab.flush()
    for _ in range(3):
        vocab.graph_logits(torch.randn(2, H), slots(1, -1))
    vocab.graph_logits(torch.randn(2, H), slots(-1, -1))  # a dummy run: not a draft of a request
    vocab.read_counters()
    assert (vocab.stats.steps, vocab.stats.rows, vocab.stats.active_sum) == (3, 3, 9)
    assert vocab.stats.scored_sum == 3 * 16  # the fixed capacity, every call


def test_a_tensor_parallel_head_gives_every_rank_the_full_rows(weight):
    """Two ranks each hold half of the (pruned) draft rows; one all-reduce per gather assembles full rows on both.
    The ranks run in lockstep threads; the fake all-reduce sums their contributions."""
    draft_rows = weight[:40]
    draft_index = torch.full((V,), -1, dtype=torch.long)
    draft_index[torch.arange(40) + 10] = torch.arange(40)  # draft row d scores target id d + 10
    shards = [(0, 20), (20, 40)]
    all_reduce, results = LockstepAllReduce(2), {}

    def rank_run(rank):
        start, end = shards[rank]
        rows = HeadRows(draft_rows[start:end].clone(), V, draft_index, shard=(start, end),
                        all_reduce=all_reduce.of(rank))
        vocab = ActiveVocab(rows, V, slots=2, core_ids=[10, 49], capacity=16, buffer_capacity=32)
        vocab.absorb("a", [12, 35, 48, 3])  # 3 cannot be drafted
        hidden = torch.ones(1, H)
        results[rank] = vocab.logits(hidden, ["a"], None)

    threads = [threading.Thread(target=rank_run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [10, 12, 35, 48, 49]
    expected = torch.ones(1, H) @ draft_rows[draft_index[ids]].T
    for rank in (0, 1):
        assert finite(results[rank]) == [set(ids)]
        assert torch.allclose(results[rank][0, ids], expected[0], atol=1e-5)


# ----- issue 35: the plugin's cost defects -----
def pruned_index(rows: int, stride: int = 5) -> torch.Tensor:
    """[V] draft row of each target id: a pruned EAGLE-3 head (d2t) drafting ids 0, stride, 2 * stride, ..."""
    index = torch.full((V,), -1, dtype=torch.long)
    index[torch.arange(rows) * stride] = torch.arange(rows)
    return index


@pytest.mark.parametrize("fixed", [True, False], ids=["v2", "v1"])
def test_the_buffer_is_sized_by_the_heads_own_rows_not_the_target_vocabulary(weight, fixed):
    """Defect 1: a pruned head has fewer rows than the target has ids; a buffer sized from the target's vocabulary
    makes the 'restricted' V2 head multiply more rows than the head itself holds."""
    vocab = ActiveVocab(weight[:12], V, slots=2, core_ids=[0], capacity=16, buffer_capacity=32,
                        draft_index=pruned_index(12), fixed=fixed)
    assert vocab.buffer_capacity == 12 and vocab.buffer_rows.shape[0] == 12 and vocab.capacity == 12
    vocab.admit("a", [5, 10, 11], slot=0)  # 11 cannot be drafted
    vocab.flush()
    if fixed:
        logits = vocab.graph_logits(torch.randn(1, H), slots(0))
        vocab.read_counters()
        assert vocab.stats.scored_sum == 12  # the head's 12 rows, not min(32, V = 64)
    else:
        logits = vocab.logits(torch.randn(1, H), ["a"], None)
    assert finite(logits) == [{0, 5, 10}]


def empty_set_restriction(weight):
    from nanospec_vllm.restriction import Restriction, Settings

    rows = HeadRows(weight[:8], V, pruned_index(8, stride=2))  # draftable: 0, 2, ..., 14
    return Restriction(Settings(static_core=(), capacity=8, buffer_capacity=8), slots=SLOTS, vocab_size=V,
                       runner="v2", rows=lambda: rows, transform=LogitTransform)


def test_a_batch_of_empty_set_requests_is_not_reported_as_unrestricted(weight):
    """Defect 5: requests with nothing draftable (no core) draft from the reserved set; that is the restriction
    applying, and a proposal made only of such rows must not raise the 'did not apply' warning."""
    restriction = empty_set_restriction(weight)
    restriction.admit("a", [1, 3, 5], slot=0)
    restriction.admit("b", [7], slot=2)
    restriction.begin_v2(calls=3, real=True)
    restriction.row_slots = slots(0, 2, -1)
    for _ in range(3):
        assert finite(restriction.logits(torch.randn(3, H), None)) == [{0}, {0}, {0}]  # the reserved set
    restriction.end_step()
    stats = restriction.stats_json()
    assert restriction.stats.shortfall() is None and stats["restricted_every_step"]
    assert stats["steps"] == 3 and stats["fallback_rows"] == 6

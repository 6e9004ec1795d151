"""Synchronisation as a design rule: a decode round reads the device through decoding.host.read only, and a fixed
number of times (on a GPU each read drains the queue). On the CPU every Python conversion of a tensor (tolist,
item, bool, int, float) is counted, so a read that bypasses the helper fails the test too."""
import pytest
import torch

from nanospec_core.config import GenerationConfig, TreeConfig, VocabConfig
from nanospec_core.decoding import host
from nanospec_core.decoding.engine import speculative_decode
from nanospec_core.decoding.request import Request, Spans
from nanospec_core.models.eagle import random_head
from nanospec_core.models.target import TargetModel
from nanospec_core.vocab.policies import make_policy
from tests.conftest import TINY_VOCAB, tiny_hf_model

CONVERSIONS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")
# reads per greedy round: rerank + verify + stats, and for NanoSpec the active-set update
READS_PER_ROUND = {"full": 3, "nanospec": 4, "static": 3}


@pytest.fixture(scope="module")
def tiny():
    model = tiny_hf_model("qwen2")
    target = TargetModel(model)
    return target, random_head(target, seed=0)


def counted_rounds(monkeypatch, target, head, policy_name, temperature=0.0):
    """(helper reads, raw conversions) per round >= 1 of one request."""
    raw = [0]
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            raw[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    policy = make_policy(policy_name, head.lm_head_weight, VocabConfig(), target.vocab_size,
                         frequency=torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(1)))
    prompt = torch.randint(3, TINY_VOCAB, (12,), generator=torch.Generator().manual_seed(0))
    gen = GenerationConfig(max_new_tokens=30, temperature=temperature, seed=0)
    stream = speculative_decode(target, head, policy, Request(prompt, gen, frozenset()),
                                TreeConfig(depth=4, top_k=3, total_tokens=10))
    next(stream)  # prefill: not a round
    counts = []
    while True:
        host.ReadCount.value, raw[0] = 0, 0
        try:
            next(stream)
        except StopIteration:
            break
        counts.append((host.ReadCount.value, raw[0]))
    monkeypatch.undo()
    return counts


@pytest.mark.parametrize("policy_name", ["full", "nanospec", "static"])
def test_a_greedy_round_reads_the_device_a_fixed_few_times(monkeypatch, tiny, policy_name):
    target, head = tiny
    counts = counted_rounds(monkeypatch, target, head, policy_name)
    assert len(counts) >= 3
    assert all(reads == READS_PER_ROUND[policy_name] for reads, _ in counts), counts
    assert all(raw == reads for reads, raw in counts), f"a read bypassed decoding.host.read: {counts}"


def test_sampling_reads_only_through_the_helper(monkeypatch, tiny):
    """Lossless sampling walks the tree with a draw per visited node: more reads, but all of them counted."""
    target, head = tiny
    counts = counted_rounds(monkeypatch, target, head, "nanospec", temperature=0.8)
    assert counts and all(raw == reads for reads, raw in counts), counts
    assert all(reads > READS_PER_ROUND["nanospec"] for reads, _ in counts)


def test_read_joins_tensors_of_mixed_kinds_in_one_transfer():
    host.ReadCount.value = 0
    ints, flags, floats = host.read(torch.tensor([[3, 151935]]), torch.tensor([True, False]), torch.tensor([0.5]))
    assert host.ReadCount.value == 1
    assert ints == [3, 151935] and flags == [True, False] and floats == [0.5]
    assert all(type(v) is int for v in ints) and all(type(v) is bool for v in flags)
    assert host.to_device([4, 5], "cpu").tolist() == [4, 5]


def test_spans_accumulate_per_name_and_clear_on_resolve():
    spans = Spans(torch.device("cpu"))
    for _ in range(3):
        spans.add("backbone", spans.mark())
    start = spans.mark()
    sum(range(10000))
    spans.add("verify", start)
    ms = spans.resolve()
    assert set(ms) == {"backbone", "verify"} and ms["verify"] > 0 and ms["backbone"] >= 0
    assert spans.resolve() == {}

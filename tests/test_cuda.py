"""The CUDA branches (skipped without a GPU; scripts/gpu_check.sh runs them where one is lent): the gather on its
side stream, events for timing, pinned copies, the fused tree attention, and greedy equality on the device."""
import pytest
import torch

from nanospec_core.config import GenerationConfig, TreeConfig, VocabConfig
from nanospec_core.decoding import host
from nanospec_core.decoding.engine import speculative_decode
from nanospec_core.decoding.plain import plain_decode
from nanospec_core.decoding.request import Request, Spans
from nanospec_core.models.eagle import random_head
from nanospec_core.models.target import TargetModel
from nanospec_core.vocab.policies import make_policy
from nanospec_core.vocab.subset_head import SubsetLMHead
from tests.conftest import TINY_VOCAB, tiny_hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def tiny_cuda():
    target = TargetModel(tiny_hf_model("qwen2").to("cuda"))
    return target, random_head(target, seed=0)


def decode(target, head, method, prompt, max_new=40):
    request = Request(prompt.cuda(), GenerationConfig(max_new_tokens=max_new), frozenset())
    if method == "vanilla":
        return [t for s in plain_decode(target, request) for t in s.tokens]
    cfg = VocabConfig(capacity=512, static_core=128)  # the default core (1,024 ids) does not fit 512
    policy = make_policy({"eagle": "full"}.get(method, method), head.lm_head_weight, cfg, target.vocab_size,
                         frequency=torch.randperm(target.vocab_size).cuda())
    return [t for s in speculative_decode(target, head, policy, request, TreeConfig(depth=4, top_k=4,
                                                                                      total_tokens=16))
            for t in s.tokens]


@pytest.mark.parametrize("method", ["eagle", "nanospec", "static"])
def test_greedy_speculative_equals_plain_on_the_gpu(tiny_cuda, method):
    target, head = tiny_cuda
    for seed in range(3):
        prompt = torch.randint(3, TINY_VOCAB, (12,), generator=torch.Generator().manual_seed(seed))
        assert decode(target, head, method, prompt) == decode(target, head, "vanilla", prompt)


def test_a_gpu_round_reads_the_device_four_times(tiny_cuda):
    target, head = tiny_cuda
    policy = make_policy("nanospec", head.lm_head_weight, VocabConfig(), target.vocab_size,
                         frequency=torch.randperm(target.vocab_size).cuda())
    prompt = torch.randint(3, TINY_VOCAB, (12,)).cuda()
    stream = speculative_decode(target, head, policy, Request(prompt, GenerationConfig(max_new_tokens=24),
                                                              frozenset()), TreeConfig(depth=4, top_k=3,
                                                                                       total_tokens=10))
    next(stream)
    for _ in range(3):
        host.ReadCount.value = 0
        next(stream)
        assert host.ReadCount.value == 4


def test_gather_on_the_side_stream_lands_before_the_gemm_reads_it():
    weight = torch.randn(5000, 64, device="cuda")
    subset = SubsetLMHead(weight, capacity=256)
    for _ in range(5):
        subset.add(torch.randint(0, 5000, (40,), device="cuda"))
        subset.gather()
        hidden = torch.randn(3, 64, device="cuda")
        logits = subset.logits(hidden)  # waits on the gather's event in the device queue
        ids = subset.slot_ids[: subset.used]
        expected = hidden @ weight[ids.clamp(min=0)].T
        torch.testing.assert_close(logits[:, ids >= 0], expected[:, ids >= 0])
    subset.check_invariants()


def test_events_time_the_device_and_pinned_copies_arrive():
    spans = Spans(torch.device("cuda"))
    start = spans.mark()
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(10):
        x = x @ x.T / 2048
    spans.add("matmul", start)
    assert spans.resolve()["matmul"] > 0
    assert host.to_device([1, 2, 3], "cuda").tolist() == [1, 2, 3]


def test_tree_attention_4d_matches_the_math_reference(tiny_cuda):
    """Tree-masked verify on the GPU (fused kernel where it applies) == the same tree on the CPU in float32."""
    target, _ = tiny_cuda
    cpu = TargetModel(tiny_hf_model("qwen2"))
    ids = torch.randint(3, TINY_VOCAB, (9,))
    mask = torch.tril(torch.ones(9, 9, dtype=torch.bool))
    mask[4, 2:4] = False  # a branch
    outs = []
    for model, device in ((target, "cuda"), (cpu, "cpu")):
        cache = model.new_cache(32)
        model.forward(ids[:3].to(device), cache)
        cache.commit()
        outs.append(model.forward(ids[3:].to(device), cache, tree_mask=mask[3:, 3:].to(device)).hidden.cpu())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_head", [False, True], ids=["lookup", "nanospec+copy"])
def test_greedy_copy_branches_equal_plain_on_the_gpu_without_extra_reads(with_head):
    """Copy branches on the device: the merged tree's host-built nodes reach the GPU through pinned copies, the
    output is plain greedy decoding, copied tokens are committed, and a round reads the device no more often."""
    from nanospec_core.config import CopyConfig
    from tests.test_copy_engine import VOCAB, repetitive_prompt

    target = TargetModel(tiny_hf_model("qwen2", vocab=VOCAB).to("cuda"))
    head = random_head(target, seed=3) if with_head else None
    policy = make_policy("nanospec", head.lm_head_weight, VocabConfig(static_core=0), target.vocab_size) \
        if with_head else None
    prompt = repetitive_prompt(0).cuda()
    request = Request(prompt, GenerationConfig(max_new_tokens=60), frozenset())
    stream = speculative_decode(target, head, policy, request, TreeConfig(depth=3, top_k=3, total_tokens=6),
                                copy=CopyConfig())
    steps, reads = [next(stream)], []
    for step in stream:
        reads.append(host.ReadCount.value)
        host.ReadCount.value = 0
        steps.append(step)
    assert [t for s in steps for t in s.tokens] == [t for s in plain_decode(target, Request(
        prompt, GenerationConfig(max_new_tokens=60), frozenset())) for t in s.tokens]
    assert sum(s.copy_accepted for s in steps) > 0
    assert set(reads[1:]) == {4 if with_head else 1}, reads

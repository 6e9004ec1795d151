"""Copy branches in the round loop: lossless (greedy token for token, sampling in distribution), really exercised
(copied tokens are committed), counted per round, and free of extra device reads."""
import pytest
import torch

from nanospec_core.config import CopyConfig, GenerationConfig, TreeConfig, VocabConfig
from nanospec_core.decoding import host
from nanospec_core.decoding.engine import speculative_decode
from nanospec_core.decoding.plain import plain_decode
from nanospec_core.decoding.request import Request
from nanospec_core.models.eagle import random_head
from nanospec_core.models.target import TargetModel
from nanospec_core.vocab.policies import make_policy
from tests.conftest import tiny_hf_model
from tests.test_engine import TargetAsHead
from tests.test_verify import chi_square

VOCAB = 64  # a small vocabulary: the random target repeats itself, so copies are often right (as in real text)
TREE = TreeConfig(depth=3, top_k=3, total_tokens=6)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def target(request):
    return TargetModel(tiny_hf_model(request.param, vocab=VOCAB))


def request_for(prompt, max_new=60, stop=(), temperature=0.0, seed=0):
    gen = GenerationConfig(max_new_tokens=max_new, temperature=temperature, seed=seed)
    return Request(prompt_ids=prompt, gen=gen, stop_ids=frozenset(stop))


def repetitive_prompt(seed: int) -> torch.Tensor:
    """A phrase said three times with a word changed: a context worth copying from."""
    phrase = torch.randint(3, VOCAB, (8,), generator=torch.Generator().manual_seed(seed))
    varied = phrase.clone()
    varied[3] = (varied[3] + 1) % VOCAB
    return torch.cat([phrase, varied, phrase])


def tokens_of(steps):
    return [t for s in steps for t in s.tokens]


def plain(target, prompt, **kw):
    return tokens_of(plain_decode(target, request_for(prompt, **kw)))


def decode(target, prompt, head=None, policy_name="full", copy=CopyConfig(), tree=TREE, **kw):
    policy = None
    if head is not None:
        policy = make_policy(policy_name, head.lm_head_weight, VocabConfig(static_k=32, static_core=8),
                             target.vocab_size, head_to_target=head.head_to_target,
                             frequency=torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(1)))
    return list(speculative_decode(target, head, policy, request_for(prompt, **kw), tree, copy=copy))


@pytest.mark.parametrize("seed", range(3))
def test_greedy_lookup_equals_plain_decoding_and_commits_copied_tokens(target, seed):
    prompt = repetitive_prompt(seed)
    steps = decode(target, prompt)
    assert tokens_of(steps) == plain(target, prompt)
    assert sum(s.copy_accepted for s in steps) >= 5  # the path is exercised: copied tokens were committed ...
    assert max(s.copy_accepted for s in steps) >= 2  # ... several in one round
    for s in steps[1:]:
        assert s.tree_size == s.copy_nodes  # no head: every node is a copy node
        assert s.copy_accepted == sum(s.copied) == s.accepted - 1 or s.finished  # all drafts are copies


@pytest.mark.parametrize("policy_name", ["full", "static", "nanospec"])
def test_greedy_head_plus_copies_equals_plain_decoding(target, policy_name):
    """A random head (its drafts almost never accepted, the copies are) and the target as its own head (long
    head paths that the copy branches often share: merged prefixes)."""
    prompt = repetitive_prompt(7)
    expected = plain(target, prompt)
    steps = decode(target, prompt, random_head(target, "eagle2", seed=3), policy_name)
    assert tokens_of(steps) == expected
    assert sum(s.copy_accepted for s in steps) >= 5
    strong = decode(target, prompt, TargetAsHead(target), policy_name)
    assert tokens_of(strong) == expected
    merged = [node for s in strong[1:] for node, origin in enumerate(s.tree.origins) if origin == "both"]
    assert merged  # copy branches walked through head nodes


def test_merged_trees_hold_no_duplicate_siblings_and_the_view_names_each_nodes_origin(target):
    steps = decode(target, repetitive_prompt(2), TargetAsHead(target))
    for s in steps[1:]:
        view = s.tree
        siblings = list(zip(view.parents, view.tokens))
        assert len(set(siblings)) == len(siblings)
        head_nodes = s.tree_size - s.copy_nodes
        assert view.origins[head_nodes:] == ["copy"] * s.copy_nodes
        assert all(origin in ("head", "both") for origin in view.origins[:head_nodes])
        context = [t for t in repetitive_prompt(2).tolist()] + tokens_of(steps[:s.round])
        for node, source in enumerate(view.sources):  # a copied node's source position holds its token
            assert (source is None) == (view.origins[node] == "head")
            if source is not None:
                assert context[source] == view.tokens[node]


def test_eos_and_the_token_limit_cut_inside_a_copy_round(target):
    prompt = repetitive_prompt(0)
    reference = plain(target, prompt, max_new=40)
    steps = decode(target, prompt, max_new=40)
    round_ = next(s for s in steps[1:] if s.copy_accepted >= 2)
    stop = round_.tokens[1]  # a copied token mid-round is the stop id
    cut = decode(target, prompt, max_new=40, stop=(stop,))
    assert tokens_of(cut) == reference[:reference.index(stop) + 1] and cut[-1].finished
    for limit in (1, 2, 5, 17):
        assert tokens_of(decode(target, prompt, max_new=limit)) == reference[:limit]


def test_without_a_budget_no_copy_node_is_drafted(target):
    """choose_copy's answer where extra verify nodes cannot pay (max_nodes 0, min_accept 1): the tree is the head's."""
    prompt = repetitive_prompt(1)
    for copy in (CopyConfig(max_nodes=0), CopyConfig(min_accept=1.0)):
        steps = decode(target, prompt, random_head(target, "eagle2", seed=3), copy=copy)
        assert tokens_of(steps) == plain(target, prompt)
        assert all(s.copy_nodes == 0 and s.copy_accepted == 0 for s in steps)


def test_copy_rounds_make_no_extra_device_reads(target):
    """Copies live on the host (the committed ids are host lists, the head tree's layout rides on the rerank read),
    so a round reads the device as often as without them: eagle 3 (rerank, verify, stats); lookup 1 (verify)."""
    prompt = repetitive_prompt(3)
    for head, reads in ((random_head(target, "eagle2", seed=3), 3), (None, 1)):
        policy = None if head is None else make_policy("full", head.lm_head_weight, VocabConfig(), target.vocab_size)
        stream = speculative_decode(target, head, policy, request_for(prompt, max_new=30), TREE, copy=CopyConfig())
        next(stream)
        counts = []
        for _ in stream:
            counts.append(host.ReadCount.value)
            host.ReadCount.value = 0
        assert set(counts[1:]) == {reads}, counts


def copy_ready_prompt(target, prompt: torch.Tensor) -> torch.Tensor:
    """The prompt plus the greedy lookup output up to the round before one that commits >= 3 copied tokens: the
    first round after it drafts copies the target likes (so sampled runs accept them often)."""
    steps = decode(target, prompt, max_new=60)
    produced = len(steps[0].tokens)
    for s in steps[1:]:
        if s.copy_accepted >= 3:
            break
        produced += len(s.tokens)
    return torch.cat([prompt, torch.tensor(tokens_of(steps)[:produced - 1])])  # the prefill yields the round's root


def exact_first_three(model, prompt: torch.Tensor, temperature: float) -> torch.Tensor:
    """[V, V, V] P(x1, x2, x3) = p(x1) p(x2 | x1) p(x3 | x1, x2) of the target, by batched forwards."""
    def probs(batch):  # [B, L] -> [B, V] next-token probabilities after each row
        with torch.no_grad():
            logits = model(batch).logits[:, -1].double()
        return torch.softmax(logits / temperature, dim=-1)

    p1 = probs(prompt[None])[0]  # [V]
    grid = torch.arange(VOCAB)
    p2 = probs(torch.cat([prompt.expand(VOCAB, -1), grid[:, None]], dim=1))  # [V, V]
    pairs = torch.cartesian_prod(grid, grid)  # [V*V, 2]
    p3 = probs(torch.cat([prompt.expand(VOCAB * VOCAB, -1), pairs], dim=1)).reshape(VOCAB, VOCAB, VOCAB)
    return p1[:, None, None] * p2[:, :, None] * p3


def test_sampling_with_copy_branches_keeps_the_target_distribution():
    """Copy drafts are point masses, like every sibling verify_sampling tries: accepting x_j with its residual
    probability p_j(x_j) is exact for any set of distinct siblings, whatever proposed them (verify.py). Checked
    end to end: the first three tokens of many seeded lookup runs against the target's exact joint distribution."""
    model = tiny_hf_model("qwen2", vocab=VOCAB)
    target, temperature = TargetModel(model), 0.7
    prompt = copy_ready_prompt(target, repetitive_prompt(4))
    counts = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.long)
    copied = 0
    for seed in range(3000):
        steps = decode(target, prompt, max_new=3, temperature=temperature, seed=seed)
        x1, x2, x3 = tokens_of(steps)
        counts[x1, x2, x3] += 1
        copied += sum(s.copy_accepted for s in steps)
    assert copied > 300  # copies were accepted in many runs: the sampled path really went through them
    statistic, critical = chi_square(counts, exact_first_three(model, prompt, temperature))
    assert statistic < critical, f"chi2 {statistic:.1f} >= {critical:.1f}"



FREE = CopyConfig(head_held=(0.5, 0.25), head_round_ms=100.0, node_ms=0.0, free_round_ms=1.0, free_node_ms=0.0)


class AbsorbSpy(TargetAsHead):
    """The target as its own head, recording the token of every pair it absorbs (the calls without positions)."""

    def __init__(self, target):
        super().__init__(target)
        self.absorbed: list[int] = []

    def forward(self, ids, features, cache, positions=None, tree_mask=None):
        if positions is None:
            self.absorbed += ids.tolist()
        return super().forward(ids, features, cache, positions, tree_mask)


@pytest.mark.parametrize("policy_name", ["full", "nanospec"])
def test_head_free_rounds_stay_lossless_and_the_head_absorbs_the_pairs_they_committed(target, policy_name):
    """Costs that make every round with a copy candidate head-free: greedy output is still plain decoding's, and
    the head's next draft absorbs every pair the head-free rounds committed, in order (its context has no hole)."""
    prompt = repetitive_prompt(5)
    expected = plain(target, prompt)
    assert tokens_of(decode(target, prompt, random_head(target, "eagle2", seed=3), policy_name, copy=FREE)) == expected
    spy = AbsorbSpy(target)
    steps = decode(target, prompt, spy, policy_name, copy=FREE)
    assert tokens_of(steps) == expected
    rounds = steps[1:]
    free = [n for n, s in enumerate(rounds) if s.head_free]
    last_head = max(n for n, s in enumerate(rounds) if not s.head_free)
    assert free and any(n < last_head for n in free)  # head-free rounds ran, and a head round after one
    for s in rounds:
        assert s.head_free == (s.copy_nodes == s.tree_size)  # a head-free round's nodes are all copies
    # pair t couples f_t with x_{t+1}: the absorbed tokens are the context from its second token on, without a gap
    context = prompt.tolist() + tokens_of(steps)
    assert spy.absorbed == context[1:1 + len(spy.absorbed)]
    assert len(spy.absorbed) == len(prompt) - 1 + len(tokens_of(steps[:1 + last_head]))  # up to that round's root

"""The decode loops: vanilla equals transformers greedy; speculative greedy equals vanilla for any tree/head/policy."""
import pytest
import torch

from nanospec_core.config import GenerationConfig, TreeConfig, VocabConfig
from nanospec_core.decoding.engine import speculative_decode
from nanospec_core.decoding.request import Request
from nanospec_core.decoding.plain import hf_generate, plain_decode
from nanospec_core.metrics import summarize
from nanospec_core.models.eagle import random_head
from nanospec_core.models.target import TargetModel
from nanospec_core.vocab.policies import make_policy
from tests.conftest import TINY_VOCAB, tiny_hf_model

EOS = 2


def request(prompt, max_new=40, stop=(), temperature=0.0, seed=0):
    gen = GenerationConfig(max_new_tokens=max_new, temperature=temperature, seed=seed)
    return Request(prompt_ids=prompt, gen=gen, stop_ids=frozenset(stop))


def tokens_of(steps):
    return [t for s in steps for t in s.tokens]


def prompt_ids(seed=0, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY_VOCAB, (length,), generator=g)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny(request):
    model = tiny_hf_model(request.param)
    return model, TargetModel(model)


def test_vanilla_greedy_equals_transformers_greedy(tiny):
    model, target = tiny
    for seed in range(3):
        prompt = prompt_ids(seed)
        ours = tokens_of(plain_decode(target, request(prompt)))
        ref = model.generate(prompt.unsqueeze(0), max_new_tokens=40, do_sample=False, eos_token_id=None,
                             attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long))[0, prompt.numel():]
        assert ours == ref.tolist()


def test_hf_method_returns_generate_tokens(tiny):
    model, target = tiny
    prompt = prompt_ids(5)
    assert tokens_of(hf_generate(model, request(prompt))) == tokens_of(plain_decode(target, request(prompt)))


def speculative(target, head, prompt, tree, policy_name="full", vocab=None, **kw):
    policy = make_policy(policy_name, head.lm_head_weight, vocab or VocabConfig(), target.vocab_size,
                         head_to_target=head.head_to_target,
                         frequency=torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(1)))
    return list(speculative_decode(target, head, policy, request(prompt, **kw), tree))


TREES = [TreeConfig(depth=d, top_k=k, total_tokens=n)
         for d, k, n in [(1, 1, 1), (1, 10, 10), (2, 3, 6), (3, 1, 3), (4, 4, 16), (5, 8, 24), (6, 10, 64),
                         (6, 2, 7), (3, 10, 5)]]


def test_greedy_eagle3_head_equals_vanilla(tiny):
    _, target = tiny
    head = random_head(target, "eagle3", seed=4)
    prompt = prompt_ids(2)
    steps = speculative(target, head, prompt, TreeConfig(depth=4, top_k=4, total_tokens=12))
    assert tokens_of(steps) == tokens_of(plain_decode(target, request(prompt)))


class TargetAsHead:
    """A draft "head" that is the target itself (without the first prompt token): it accepts long paths, which a
    random head never does, so commit/keep-path bookkeeping is exercised at depth."""

    kind, aux_layers, head_to_target = "self", (), None

    def __init__(self, target):
        self.target = target
        self.lm_head_weight = target.lm_head_weight

    def target_features(self, out):
        return out.hidden

    def new_cache(self, max_len):
        return self.target.new_cache(max_len + 1)

    def forward(self, ids, features, cache, positions=None, tree_mask=None):
        # pair (f_t, x_{t+1}) sits at head position t; the target reads x_{t+1} at position t + 1
        positions = positions + 1 if positions is not None else None
        return self.target.forward(ids, cache, positions=positions, tree_mask=tree_mask).hidden

    def lm_input(self, hidden):
        return hidden


@pytest.mark.parametrize("tree", TREES, ids=lambda t: f"d{t.depth}-k{t.top_k}-n{t.total_tokens}")
def test_greedy_eagle_equals_vanilla_for_tree_settings(tiny, tree):
    """A random head (almost every draft rejected) and the target as its own head (long accepted paths, so the
    tree layout and keep-path commits are exercised at every depth the tree allows)."""
    _, target = tiny
    prompt = prompt_ids(1)
    expected = tokens_of(plain_decode(target, request(prompt)))
    assert tokens_of(speculative(target, random_head(target, "eagle2", seed=3), prompt, tree)) == expected
    steps = speculative(target, TargetAsHead(target), prompt, tree)
    assert tokens_of(steps) == expected
    assert max(s.accepted for s in steps[1:]) >= 2  # drafts were accepted: commits kept real paths
    if tree.top_k <= 4 and tree.total_tokens >= 2 * tree.depth:  # narrow, deep enough trees keep long chains
        assert max(s.accepted for s in steps[1:]) >= 3


@pytest.mark.parametrize("policy_name", ["full", "nanospec"])
def test_greedy_with_a_strong_draft_accepts_long_paths_and_equals_vanilla(tiny, policy_name):
    _, target = tiny
    prompt = prompt_ids(8)
    steps = speculative(target, TargetAsHead(target), prompt, TreeConfig(depth=5, top_k=3, total_tokens=12),
                        policy_name, max_new=48)
    assert tokens_of(steps) == tokens_of(plain_decode(target, request(prompt, max_new=48)))
    summary = summarize(steps, 1.0)
    # a random tiny target wanders outside its context, so the in-context set misses more than the full vocab
    assert summary.mean_accepted > (2.0 if policy_name == "full" else 1.2)


def test_eos_inside_a_round_stops_exactly_like_vanilla(tiny):
    _, target = tiny
    prompt = prompt_ids(3)
    reference = tokens_of(plain_decode(target, request(prompt, max_new=30)))
    stop = reference[7]  # pretend the 8th generated token is EOS
    expected = reference[: reference.index(stop) + 1]
    head = TargetAsHead(target)  # rounds commit several tokens, so the stop id falls inside one
    for tree in TREES[:6]:
        steps = speculative(target, head, prompt, tree, max_new=30, stop=(stop,))
        assert tokens_of(steps) == expected and steps[-1].finished
    assert max(s.accepted for s in steps[1:]) > 1
    assert tokens_of(plain_decode(target, request(prompt, max_new=30, stop=(stop,)))) == expected


@pytest.mark.parametrize("max_new", [1, 2, 7, 33])
def test_max_new_tokens_is_exact(tiny, max_new):
    _, target = tiny
    steps = speculative(target, TargetAsHead(target), prompt_ids(4), TreeConfig(depth=5, top_k=4, total_tokens=16),
                        max_new=max_new)
    assert len(tokens_of(steps)) == max_new  # the limit cuts inside a multi-token round
    assert steps[-1].finished
    assert tokens_of(steps) == tokens_of(plain_decode(target, request(prompt_ids(4), max_new=max_new)))


@pytest.mark.parametrize("policy_name,vocab", [
    ("static", VocabConfig(static_k=512)),
    ("nanospec", VocabConfig()),
    ("nanospec", VocabConfig(capacity=64, prompt_topk=3, node_topk=3, static_core=0)),  # tiny capacity forces eviction
    ("nanospec", VocabConfig(capacity=64, static_core=16, fallback_threshold=0.9, fallback_window=2)),
])
def test_greedy_subset_policies_equal_vanilla(tiny, policy_name, vocab):
    _, target = tiny
    head = random_head(target, "eagle2", seed=5)
    prompt = prompt_ids(6)
    steps = speculative(target, head, prompt, TreeConfig(depth=4, top_k=4, total_tokens=12), policy_name, vocab)
    assert tokens_of(steps) == tokens_of(plain_decode(target, request(prompt)))
    summary = summarize(steps, wall_s=1.0)
    assert summary.avg_active_vocab is not None and summary.coverage is not None
    if policy_name == "nanospec":
        assert summary.avg_active_vocab <= max(vocab.capacity, 16)


def test_step_stats_are_consistent(tiny):
    _, target = tiny
    head = random_head(target, "eagle2", seed=6)
    steps = speculative(target, head, prompt_ids(7), TreeConfig(depth=3, top_k=3, total_tokens=8))
    assert steps[0].round == 0 and all(s.round == i for i, s in enumerate(steps))
    for s in steps[1:]:
        assert 1 <= s.accepted <= 4 and s.accepted == len(s.tokens) == len(s.hits)
        assert s.draft_ms >= s.backbone_ms + s.lm_head_ms - 1e-6
        assert s.tree_size <= 8
    summary = summarize(steps, wall_s=1.0)
    assert summary.new_tokens == 40
    assert summary.mean_accepted == pytest.approx(sum(s.accepted for s in steps[1:]) / (len(steps) - 1))


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_drafting_builds_no_autograd_graph_and_keeps_no_tensors(tiny, kind):
    """The head's weights require grad (they are trainable); decoding must not record a graph. Held across
    requests, such a graph grew a long benchmark to 24 GB (OOM) before this was fixed."""
    import gc
    import warnings

    _, target = tiny
    head = random_head(target, kind, seed=5)
    assert any(p.requires_grad for p in head.parameters())

    def graph_tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated aliases warns
            warnings.simplefilter("ignore", FutureWarning)
            return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None]

    before = len(graph_tensors())
    for seed in range(2):
        steps = speculative(target, head, prompt_ids(seed), TreeConfig(depth=3, top_k=4, total_tokens=8), max_new=12)
        assert len(tokens_of(steps)) == 12
    del steps
    assert len(graph_tensors()) == before


def test_hf_generate_ignores_the_model_generation_config_defaults():
    """transformers fills unset settings from model.generation_config: a hub model's repetition penalty must not
    reach the `hf` baseline, or it decodes another distribution than every other method."""
    from nanospec_core.decoding.plain import hf_generate, plain_decode

    model = tiny_hf_model()
    model.generation_config.repetition_penalty = 1.5
    request = Request(prompt_ids=torch.arange(3, 1500), gen=GenerationConfig(max_new_tokens=16),
                      stop_ids=frozenset())  # the prompt holds most ids: a penalty would move the argmax
    hf_tokens = [t for step in hf_generate(model, request) for t in step.tokens]
    plain_tokens = [t for step in plain_decode(TargetModel(model), request) for t in step.tokens]
    assert hf_tokens == plain_tokens


def test_hf_sampling_leaves_the_global_rng_alone():
    from nanospec_core.decoding.plain import hf_generate

    model = tiny_hf_model()  # built first: it seeds the global RNG itself
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    request = Request(prompt_ids=torch.tensor([1, 5, 9]), gen=GenerationConfig(max_new_tokens=4, temperature=0.8,
                                                                              seed=7), stop_ids=frozenset())
    list(hf_generate(model, request))
    assert torch.equal(torch.rand(3), expected)


def test_step_stats_carry_the_round_tree_and_the_path_the_target_took(tiny):
    """The round view's data: the drafted tree (tokens, parents, scores) and the accepted path, read with the
    verification itself; the path's tokens then the bonus are exactly the round's committed tokens."""
    _, target = tiny
    steps = speculative(target, TargetAsHead(target), prompt_ids(9), TreeConfig(depth=4, top_k=3, total_tokens=9),
                        max_new=200, stop=())
    assert steps[0].tree is None
    deep = 0
    for s in steps[1:-1]:  # the last round may be cut at the token limit
        tree = s.tree
        assert len(tree.tokens) == len(tree.parents) == len(tree.scores) == s.tree_size
        chain = [-1] + tree.path
        assert all(tree.parents[node] == parent for parent, node in zip(chain, chain[1:]))
        assert [tree.tokens[i] for i in tree.path] + [tree.bonus] == s.tokens
        assert all(tree.scores[c] <= tree.scores[p] + 1e-6 for c, p in enumerate(tree.parents) if p >= 0)
        deep = max(deep, len(tree.path))
        assert s.to_json()["tree"]["path"] == tree.path
    assert deep >= 2

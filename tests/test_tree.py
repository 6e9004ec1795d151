"""EAGLE-2 dynamic tree: structure invariants, head-call protocol, and equality with a naive reference."""
from __future__ import annotations

import itertools

import pytest
import torch

from nanospec_core.config import TreeConfig
from nanospec_core.decoding.tree import DraftTree, build_tree

BASE_POSITION = 17


class FakeHead:
    """A deterministic draft head with random tables (float64), which also checks the step protocol.

    hidden(token, parent_hidden, position) = tanh(parent_hidden / 2 + emb[token] + pos[position]);
    topk scores log_softmax(hidden @ W) over `active` ids only, padding with -inf when k > len(active).
    Every step call is checked: positions are base + level - 1, and attn_mask row i is exactly the fed
    ancestors of node i plus itself (parents are identified by their hidden state).
    """

    def __init__(self, vocab: int = 13, hidden: int = 8, seed: int = 0, active: list[int] | None = None,
                 check_protocol: bool = True):
        self.check_protocol = check_protocol
        gen = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
        self.pos = torch.randn(64, hidden, generator=gen, dtype=torch.float64)
        self.out = torch.randn(hidden, vocab, generator=gen, dtype=torch.float64) * 2.0
        self.active = torch.tensor(active if active is not None else range(vocab))
        self.root_hidden = torch.randn(hidden, generator=gen, dtype=torch.float64)
        self.fed_hidden: list[torch.Tensor] = []  # output hidden of every fed draft entry, in feeding order
        self.fed_ancestors: list[set[int]] = []  # fed indices of each entry's fed ancestors (not itself)
        self.calls = 0

    def hidden(self, tokens, parent_hidden, positions):
        return torch.tanh(parent_hidden / 2 + self.emb[tokens] + self.pos[positions])

    def topk(self, hidden, k):
        logp = torch.log_softmax(hidden @ self.out[:, self.active], dim=-1)  # [m, |active|]
        values, where = logp.topk(min(k, len(self.active)), dim=-1)
        ids = self.active[where]
        pad = k - values.shape[1]
        values = torch.cat([values, torch.full((len(hidden), pad), float("-inf"), dtype=values.dtype)], dim=1)
        ids = torch.cat([ids, torch.zeros(len(hidden), pad, dtype=torch.long)], dim=1)
        return values, ids

    def root(self, k):
        logp, ids = self.topk(self.root_hidden[None], k)
        return logp[0], ids[0]

    def step(self, tokens, parent_hidden, positions, attn_mask):
        m, fed = len(tokens), len(self.fed_hidden)
        assert parent_hidden.shape == (m, self.emb.shape[1])
        assert attn_mask.dtype == torch.bool and attn_mask.shape == (m, fed + m)
        assert positions.tolist() == [BASE_POSITION + self.calls] * m  # level-(calls+1) nodes
        new_hidden = self.hidden(tokens, parent_hidden, positions)
        for row in range(m if self.check_protocol else 0):
            if torch.equal(parent_hidden[row], self.root_hidden):
                ancestors = set()
            else:
                (parent,) = [i for i, h in enumerate(self.fed_hidden) if torch.equal(h, parent_hidden[row])]
                ancestors = self.fed_ancestors[parent] | {parent}
            visible = set(attn_mask[row].nonzero().squeeze(1).tolist())
            assert visible == ancestors | {fed + row}
            self.fed_ancestors.append(ancestors)
        self.fed_hidden.extend(new_hidden)
        self.calls += 1
        return new_hidden


def grow(head: FakeHead, cfg: TreeConfig) -> DraftTree:
    root_logp, root_ids = head.root(cfg.top_k)
    return build_tree(root_logp, root_ids, head.root_hidden, head.step, head.topk, cfg, BASE_POSITION)


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def reference_tree(head: FakeHead, cfg: TreeConfig) -> dict[tuple[int, ...], float]:
    """EAGLE-2 written naively, one node at a time: {token path root->node: score} of the chosen nodes."""
    k = cfg.top_k
    logp, ids = head.root(k)
    level = [((t,), f32(min(lp, 0.0)), head.root_hidden) for lp, t in zip(logp.tolist(), ids.tolist())
             if lp > float("-inf")]  # (path, score, parent hidden)
    candidates = list(level)
    for depth in range(2, cfg.depth + 1):
        frontier = sorted(level, key=lambda c: -c[1])[:k]  # Python's sort is stable
        level = []
        for path, score, parent_hidden in frontier:
            position = torch.tensor([BASE_POSITION + depth - 2])
            hidden = head.hidden(torch.tensor([path[-1]]), parent_hidden[None], position)
            logp, ids = head.topk(hidden, k)
            for lp, t in zip(logp[0].tolist(), ids[0].tolist()):
                if lp > float("-inf"):
                    level.append((path + (t,), f32(score + f32(min(lp, 0.0))), hidden[0]))
        candidates += level
    best = sorted(candidates, key=lambda c: -c[1])[:cfg.total_tokens]
    return {path: score for path, score, _ in best}


def token_path(tree: DraftTree, node: int) -> tuple[int, ...]:
    tokens = tree.tokens.tolist()
    return tuple(tokens[v - 1] for v in tree.path_to(node + 1)[1:])


def check_structure(tree: DraftTree) -> None:
    """Every derived view (mask, positions, children, paths) agrees with `parents`; layout is parents-first."""
    n = len(tree)
    parents, depths, scores = tree.parents.tolist(), tree.depths.tolist(), tree.scores.tolist()
    assert tree.tokens.dtype == tree.parents.dtype == tree.depths.dtype == torch.long
    assert tree.scores.dtype == torch.float32 and all(s > float("-inf") for s in scores)
    for i in range(n):
        assert -1 <= parents[i] < i  # parents precede children (ancestor-closed)
        assert depths[i] == (1 if parents[i] < 0 else depths[parents[i]] + 1)
        assert parents[i] < 0 or scores[i] <= scores[parents[i]]
    assert depths == sorted(depths)
    for i, j in zip(range(n), range(1, n)):  # score-descending within a level
        assert depths[i] != depths[j] or scores[i] >= scores[j]

    ancestors = [set(tree.path_to(v)) for v in range(n + 1)]
    mask = tree.verify_mask()
    assert mask.shape == (n + 1, n + 1) and mask.dtype == torch.bool
    assert mask.tolist() == [[col in ancestors[row] for col in range(n + 1)] for row in range(n + 1)]
    assert tree.position_offsets().tolist() == [0] + depths

    children = tree.children()
    assert sorted(itertools.chain.from_iterable(children)) == list(range(1, n + 1))
    for v, kids in enumerate(children):
        assert all(parents[c - 1] + 1 == v for c in kids)
        assert [scores[c - 1] for c in kids] == sorted((scores[c - 1] for c in kids), reverse=True)

    if n:  # the host-side depth bound covers every node (verify_mask walks that many steps)
        assert tree.depth_bound is None or tree.depth_bound >= tree.max_depth


def test_hand_built_tree_views():
    #        root
    #       /    \
    #    0:a      1:b
    #    /  \
    #  2:c  3:d
    #   |
    #  4:e
    tree = DraftTree(tokens=torch.tensor([10, 11, 12, 13, 14]), parents=torch.tensor([-1, -1, 0, 0, 2]),
                     depths=torch.tensor([1, 1, 2, 2, 3]), scores=torch.tensor([-0.1, -0.9, -0.3, -0.5, -0.7]))
    assert len(tree) == 5
    assert tree.position_offsets().tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.children() == [[1, 2], [3, 4], [], [5], [], []]
    assert tree.path_to(5) == [0, 1, 3, 5]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 0, 1, 0, 0, 0],
                             [1, 1, 0, 1, 0, 0],
                             [1, 1, 0, 0, 1, 0],
                             [1, 1, 0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(tree.verify_mask(), expected)
    check_structure(tree)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(1, 4, 3), (2, 3, 5), (3, 2, 4), (4, 4, 12), (5, 8, 24), (6, 10, 60), (6, 1, 6)])
def test_build_tree_equals_naive_eagle2_reference(shape, seed):
    depth, top_k, total = shape
    cfg = TreeConfig(depth=depth, top_k=top_k, total_tokens=total)
    head = FakeHead(seed=seed)
    tree = grow(head, cfg)
    check_structure(tree)
    assert head.calls == depth - 1  # the last level's frontier is never fed to the head
    expected = reference_tree(FakeHead(seed=seed), cfg)
    chosen = {token_path(tree, i): score for i, score in enumerate(tree.scores.tolist())}
    assert chosen.keys() == expected.keys()
    assert all(abs(chosen[path] - expected[path]) < 1e-6 for path in chosen)


@pytest.mark.parametrize("depth", range(1, 7))
def test_tree_size_over_depth_topk_total_grid(depth):
    for top_k, total in itertools.product(range(1, 11), (1, 2, 5, 17, 64)):
        cfg = TreeConfig(depth=depth, top_k=top_k, total_tokens=total)
        head = FakeHead(vocab=13, seed=depth * 100 + top_k, check_protocol=False)  # checked elsewhere
        tree = grow(head, cfg)
        candidates = top_k + (depth - 1) * top_k * top_k  # k at level 1, then best-k frontier times k children
        assert len(tree) == min(total, candidates)
        assert head.calls == depth - 1
        assert tree.max_depth <= depth
        if total <= 64 and top_k <= 3:  # the O(n^2) structure check on a subset keeps the grid fast
            check_structure(tree)


def test_top_k_one_is_a_chain():
    tree = grow(FakeHead(seed=3), TreeConfig(depth=5, top_k=1, total_tokens=24))
    assert tree.parents.tolist() == [-1, 0, 1, 2, 3]
    assert tree.depths.tolist() == [1, 2, 3, 4, 5]
    assert tree.path_to(5) == [0, 1, 2, 3, 4, 5]


def test_depth_one_never_calls_the_head_and_keeps_the_best_roots():
    head = FakeHead(seed=4)
    tree = grow(head, TreeConfig(depth=1, top_k=6, total_tokens=4))
    assert head.calls == 0
    root_logp, root_ids = head.root(6)
    assert tree.tokens.tolist() == root_ids[:4].tolist()  # topk order = score order
    assert tree.parents.tolist() == [-1] * 4 and tree.depths.tolist() == [1] * 4


def test_total_tokens_below_top_k_keeps_the_best_nodes_of_any_level():
    cfg = TreeConfig(depth=4, top_k=8, total_tokens=3)
    tree = grow(FakeHead(seed=5), cfg)
    assert len(tree) == 3
    check_structure(tree)
    chosen = {token_path(tree, i) for i in range(3)}
    assert chosen == reference_tree(FakeHead(seed=5), cfg).keys()


def test_active_vocab_smaller_than_top_k_drops_minus_inf_entries():
    active = [2, 5, 7]
    cfg = TreeConfig(depth=4, top_k=5, total_tokens=64)
    tree = grow(FakeHead(seed=6, active=active), cfg)
    check_structure(tree)
    assert set(tree.tokens.tolist()) <= set(active)
    assert len(tree) == 3 + 3 * 3 + 5 * 3 + 5 * 3  # 3 roots; 3 fed x 3 finite children; then best 5 fed x 3
    expected = reference_tree(FakeHead(seed=6, active=active), cfg)
    assert {token_path(tree, i) for i in range(len(tree))} == expected.keys()


def test_root_with_minus_inf_entries_and_an_empty_tree():
    head = FakeHead(seed=7)
    cfg = TreeConfig(depth=3, top_k=4, total_tokens=30)
    logp, ids = head.root(4)
    logp[2:] = float("-inf")
    tree = build_tree(logp, ids, head.root_hidden, head.step, head.topk, cfg, BASE_POSITION)
    check_structure(tree)
    assert len(tree) == 2 + 2 * 4 + 4 * 4 and tree.depths.tolist().count(1) == 2

    # An all -inf root: no device read decides to stop early (the head may run on the -inf frontier, whose
    # children stay -inf), and the one read in _rerank drops every candidate.
    logp[:] = float("-inf")
    fresh = FakeHead(seed=7)
    empty = build_tree(logp, ids, fresh.root_hidden, fresh.step, fresh.topk, cfg, BASE_POSITION)
    assert len(empty) == 0
    assert empty.verify_mask().tolist() == [[True]]
    assert empty.position_offsets().tolist() == [0]
    assert empty.children() == [[]]
    assert empty.path_to(0) == [0]


def test_zero_log_prob_ties_keep_parents_before_children():
    """A fully confident head (log q = 0) makes every descendant tie with its ancestors; depth breaks ties."""

    def confident_topk(hidden, k):
        logp = torch.full((len(hidden), k), -5.0)
        logp[:, 0] = 0.0
        return logp, torch.arange(k).repeat(len(hidden), 1)

    def step(tokens, parent_hidden, positions, attn_mask):
        return parent_hidden + 1

    cfg = TreeConfig(depth=5, top_k=3, total_tokens=4)
    tree = build_tree(torch.tensor([0.0, -5.0, -5.0]), torch.arange(3), torch.zeros(4), step, confident_topk,
                      cfg, BASE_POSITION)
    check_structure(tree)
    assert tree.parents.tolist() == [-1, 0, 1, 2] and tree.scores.tolist() == [0.0] * 4

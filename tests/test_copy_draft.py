"""Copy drafting: the incremental n-gram index equals a rescan, spans point at the copied text, branches merge into
the draft tree without duplicate siblings, and the copy budget follows this machine's verify costs."""
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanospec_core.config import CopyConfig
from nanospec_core.decoding.copy_draft import SCAN_PER_NGRAM, CopyAcceptance, CopyDrafter
from nanospec_core.decoding.tree import DraftTree, add_branches, held_prefix
from nanospec_core.decoding.tree_choice import choose_copy, describe_copy, interpolate


def rescan(context: list[int], cfg: CopyConfig) -> list[tuple[list[int], int, int]]:
    """The specification, by brute force over the whole context: (tokens, start, match) per candidate."""
    last, found = len(context) - 1, []
    if cfg.branches == 0 or cfg.length == 0:
        return found
    for n in range(min(cfg.max_ngram, len(context)), cfg.min_ngram - 1, -1):
        suffix = context[-n:]
        ends = [p for p in range(last - 1, n - 2, -1) if context[p - n + 1:p + 1] == suffix]
        for p in ends[:SCAN_PER_NGRAM]:
            tokens = context[p + 1:p + 1 + cfg.length]
            if any(f[0][:len(tokens)] == tokens for f in found):
                continue
            found.append((tokens, p + 1, n))
            if len(found) == cfg.branches:
                return found
    return found


configs = st.builds(lambda lo, extra, branches, length: CopyConfig(min_ngram=lo, max_ngram=lo + extra,
                                                                   branches=branches, length=length),
                    st.integers(1, 3), st.integers(0, 3), st.integers(0, 4), st.integers(0, 6))


@settings(max_examples=200, deadline=None)
@given(cfg=configs, context=st.lists(st.integers(0, 4), min_size=1, max_size=60),
       cuts=st.lists(st.integers(1, 7), min_size=1, max_size=30))
def test_incremental_index_equals_a_rescan_after_every_commit(cfg, context, cuts):
    """A small alphabet makes repeats (and long runs of one token) common; commits arrive in chunks of any size."""
    drafter = CopyDrafter(cfg)
    drafter.begin(context[:1])
    position = 1
    for cut in cuts:
        drafter.extend(context[position:position + cut])
        position = min(len(context), position + cut)
        got = [(c.tokens, c.start, c.match) for c in drafter.candidates()]
        assert got == rescan(context[:position], cfg)
        for tokens, start, match in got:  # the source span holds the copied tokens, after the same n-gram
            ctx = context[:position]
            assert ctx[start:start + len(tokens)] == tokens and 0 < len(tokens) <= cfg.length
            assert ctx[start - match:start] == ctx[-match:] and start - 1 < len(ctx) - 1
        if position == len(context):
            break


def test_longest_match_first_then_most_recent_and_no_repeated_branch():
    drafter = CopyDrafter(CopyConfig(max_ngram=3, branches=3, length=2))
    #              0  1  2  3  4  5  6  7  8  9 10 11 12
    drafter.begin([1, 2, 3, 9, 8, 2, 3, 5, 2, 3, 8, 2, 3])  # ends with (8, 2, 3), which ended at 6 before
    got = [(c.tokens, c.start, c.match) for c in drafter.candidates()]
    assert got == [([5, 2], 7, 3),  # the 3-gram match first, though (2, 3) recurs later
                   ([8, 2], 10, 2),  # (2, 3) ended at 9: most recent first; its end at 6 repeats [5, 2]: skipped
                   ([9, 8], 3, 2)]  # (2, 3) ended at 2


def test_acceptance_starts_at_the_prior_and_learns_the_requests_rate_per_match_length():
    cfg = CopyConfig(prior=(0.5, 0.8), prior_weight=4.0, length=4, max_ngram=3)
    acceptance = CopyAcceptance(cfg)
    assert acceptance.conditional(1, 3) == 0.5 and acceptance.conditional(3, 3) == 0.8  # the last entry holds deeper
    for _ in range(40):
        acceptance.observe(drafted=3, accepted=3, match=3)  # after 3-token matches every copied token is right ...
        acceptance.observe(drafted=2, accepted=0, match=1)  # ... after 1-token matches none
    assert acceptance.conditional(1, 3) > 0.95 and acceptance.conditional(3, 3) > 0.95
    assert acceptance.conditional(1, 1) < 0.05 and acceptance.conditional(1, 2) == 0.5  # 2-token: the prior still
    acceptance.observe(drafted=3, accepted=0, match=3)  # rejected at depth 1: depths 2, 3 were never judged
    assert acceptance.tried[3] == [41, 40, 40, 0] and acceptance.tried[1] == [40, 0, 0, 0]
    a1, a2 = acceptance.conditional(1, 3), acceptance.conditional(2, 3)
    assert acceptance.chain_logp(2, 3) == pytest.approx([math.log(a1), math.log(a1 * a2)])


def test_the_drafter_learns_from_what_entered_the_tree_and_was_accepted():
    drafter = CopyDrafter(CopyConfig(max_ngram=2, length=3, branches=1))
    drafter.begin([5, 6, 7, 8, 9, 5, 6])
    (branch,) = drafter.branches()
    assert (branch.tokens, branch.match) == ([7, 8, 9], 2)
    drafter.observe([branch], [2], accepted_tokens=[7, 4])  # the budget let 2 tokens in; the target took 7, then 4
    assert drafter.acceptance.tried[2] == [1, 1, 0] and drafter.acceptance.accepted[2] == [1, 0, 0]
    # only 1 token entered; the head drafted 8 too and the target took 7, 8, 9: the copy is judged on its token only
    drafter.observe([branch], [1], accepted_tokens=[7, 8, 9])
    assert drafter.acceptance.tried[2] == [2, 1, 0] and drafter.acceptance.accepted[2] == [2, 0, 0]


def test_branches_stop_where_the_acceptance_probability_falls_under_the_break_even():
    context = [4, 5, 6, 7, 8, 9, 4, 5]
    free = CopyDrafter(CopyConfig(length=4, prior=(0.5, 0.7, 0.8)))
    free.begin(context)
    assert [b.tokens for b in free.branches()] == [[6, 7, 8, 9]]
    gated = CopyDrafter(CopyConfig(length=4, prior=(0.5, 0.7, 0.8), min_accept=0.3))
    gated.begin(context)
    (branch,) = gated.branches()  # P: 0.5, 0.35, 0.28: the third token does not pay
    assert branch.tokens == [6, 7] and branch.scores == pytest.approx([math.log(0.5), math.log(0.35)])
    never = CopyDrafter(CopyConfig(min_accept=1.0))
    never.begin(context)
    assert never.branches() == []


# ---------------------------------------------------------------- merging into the tree


def head_tree(tokens, parents):
    depths = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depths),
                     -0.1 * torch.arange(1, len(tokens) + 1, dtype=torch.float32), depth_bound=max(depths, default=0))


def ancestors_mask(parents: list[int]) -> torch.Tensor:
    size = len(parents) + 1
    mask = torch.zeros(size, size, dtype=torch.bool)
    for v in range(size):
        u = v
        while True:
            mask[v, u] = True
            if u == 0:
                break
            u = parents[u - 1] + 1
    return mask


def test_branches_merge_with_head_nodes_and_hang_the_rest_below():
    tree = head_tree([10, 11, 12], [-1, -1, 0])  # a(10) b(11) under the root, c(12) under a
    merged, chains = add_branches(tree, [([10, 12, 13, 14], [-1.0, -2.0, -3.0, -4.0]),
                                         ([11, 15], [-1.0, -2.0]), ([10, 12], [-1.0, -2.0])], max_new=8)
    assert chains == [[0, 2, 3, 4], [1, 5], [0, 2]]
    assert merged.tokens.tolist() == [10, 11, 12, 13, 14, 15]
    assert merged.parents.tolist() == [-1, -1, 0, 2, 3, 1]
    assert merged.depths.tolist() == [1, 1, 2, 3, 4, 2] and merged.depth_bound == 4
    assert merged.host == (merged.tokens.tolist(), merged.parents.tolist())
    siblings = list(zip(merged.parents.tolist(), merged.tokens.tolist()))
    assert len(set(siblings)) == len(siblings)  # no two children of a node hold the same token
    assert torch.equal(merged.verify_mask(), ancestors_mask(merged.parents.tolist()))
    assert merged.position_offsets().tolist() == [0, 1, 1, 2, 3, 4, 2]


def test_branches_respect_the_node_budget_and_an_empty_head_tree():
    empty = DraftTree.empty("cpu")
    merged, chains = add_branches(empty, [([1, 2, 3], [-1.0, -2.0, -3.0]), ([1, 4], [-1.0, -2.0])], max_new=3)
    assert merged.tokens.tolist() == [1, 2, 3] and chains == [[0, 1, 2], [0]]  # [1, 4]: 4 is over the budget
    assert torch.equal(merged.verify_mask(), ancestors_mask([-1, 0, 1]))
    same, chains = add_branches(empty, [([1, 2], [-1.0, -2.0])], max_new=0)
    assert same is empty and chains == [[]]


# ---------------------------------------------------------------- the copy budget from the machine's costs


def test_dear_verify_nodes_buy_no_copy_branches_and_cheap_ones_do():
    held = [0.6, 0.35, 0.2]  # the head tree holds depths 1..3 with these probabilities
    cheap = interpolate({1: 10.0, 8: 11.0, 64: 20.0})  # extra nodes nearly free (a GPU-like curve)
    dear = interpolate({1: 10.0, 8: 11.0, 9: 60.0, 64: 600.0})  # every node past the head's 7 costs 50 ms
    chosen = choose_copy(cheap, round_ms=15.0, nodes=7, held=held)
    assert chosen.max_nodes > 0 and chosen.min_accept < 0.1
    none = choose_copy(dear, round_ms=15.0, nodes=7, held=held)
    assert none.max_nodes == 0 and none.min_accept == 1.0
    assert "none" in describe_copy(none) and "break-even" in describe_copy(chosen)
    lookup = choose_copy(cheap, round_ms=10.0, nodes=0, held=[])  # no head: copies are all there is
    assert lookup.max_nodes == lookup.length


def test_the_session_sets_the_copy_budget_from_its_measured_tree_and_costs(tmp_path):
    """Session.copy_choice: beside the chosen tree for the +copy methods, beside the plain step for lookup; the
    fallback budget without an acceptance table."""
    import numpy as np

    from nanospec_core.config import TreeConfig
    from nanospec_core.decoding.tree_choice import TreeChoice, save_acceptance
    from nanospec_core.session import Session

    save_acceptance(tmp_path, np.array([[0, 0], [0, 1], [1, 0], [3, 3]]), {})
    session = Session.__new__(Session)  # the parts copy_choice reads, without loading a model
    session._copy_choices, session._head_dir = {}, tmp_path
    session._tree_choice = TreeChoice(TreeConfig(depth=2, top_k=2, total_tokens=4), 2.5, 100.0, 5.0, 20.0, "test",
                                      plain_ms=10.0)
    # verify tokens: the root + 4 head nodes = 5; "dear": every token past 5 costs 70 ms or more
    curves = {"cheap": {1: 10.0, 5: 11.0, 64: 20.0}, "dear": {1: 10.0, 5: 11.0, 6: 80.0, 64: 600.0}}
    budgets = {}
    for name, verify in curves.items():
        session._copy_choices = {}
        session.tree_costs = lambda verify=verify: {"verify": verify, "level": {1: 1.0, 4: 2.0}}
        budgets[name] = session.copy_choice("nanospec+copy").max_nodes, session.copy_choice("lookup").max_nodes
        assert session.copy_choice("eagle+copy") is session.copy_choice("nanospec+copy")  # one for every head
    assert budgets["cheap"][0] > 0 and budgets["cheap"][1] == CopyConfig().length
    assert budgets["dear"] == (0, 4)  # beside the head's tree nothing pays; lookup verifies from 1 token: 4 are cheap
    session._copy_choices, session._tree_choice = {}, TreeChoice.fixed(TreeConfig(), "no table")
    assert session.copy_choice("lookup") == CopyConfig()


def test_the_head_trees_walk_says_how_much_of_a_chain_it_holds_and_whether_it_drafted_others_there():
    a, b, c, d, e = 11, 12, 13, 14, 15
    tree = DraftTree(torch.tensor([a, b, c]), torch.tensor([-1, -1, 0]), torch.tensor([1, 1, 2]), torch.zeros(3),
                     host=([a, b, c], [-1, -1, 0]))
    walk = held_prefix(tree)
    assert [walk(chain) for chain in ([a, d], [b, d], [d], [a, c, e], [a, c])] == \
        [(1, True), (1, False), (0, True), (2, False), (2, False)]
    assert held_prefix(DraftTree.empty(torch.device("cpu")))([a]) == (0, False)  # no head: nothing to diverge from


def test_where_the_head_drafted_other_tokens_a_copy_is_judged_by_its_own_lower_rate():
    context = [4, 5, 6, 7, 8, 9, 4, 5]  # the copy proposes 6, 7, 8, 9
    cfg = CopyConfig(length=4, prior=(0.5, 0.7, 0.8), diverge_prior=0.2, min_accept=0.3)
    drafter = CopyDrafter(cfg)
    drafter.begin(context)
    (alone,) = drafter.branches()  # no head: P 0.5, 0.35 pass the 0.3 cut
    assert alone.tokens == [6, 7] and not alone.diverged
    assert drafter.branches(held=lambda chain: (0, True)) == []  # the head drafted others at the root: P 0.2 < 0.3
    (beyond,) = drafter.branches(held=lambda chain: (1, False))  # the head holds 6 and drafted nothing deeper
    assert beyond.tokens == [6, 7] and beyond.held == 1 and not beyond.diverged
    (kept,) = drafter.branches(held=lambda chain: (2, True))  # 6, 7 held (free), then the head disagrees on 8
    assert kept.tokens == [6, 7] and kept.held == 2  # 8 would be right with 0.35 * 0.2: cut
    cheap = CopyDrafter(replace(cfg, min_accept=0.05))
    cheap.begin(context)
    (branch,) = cheap.branches(held=lambda chain: (1, True))
    assert branch.diverged and branch.scores[:2] == pytest.approx([math.log(0.5), math.log(0.5 * 0.2)])
    cheap.observe([branch], [len(branch.tokens)], accepted_tokens=[6, 3])  # 6 right (held), 7 rejected
    n = branch.match
    assert cheap.acceptance.diverged[n] == [1, 0]  # counted as a divergence, not as a_2
    assert cheap.acceptance.tried[n][:2] == [1, 0] and cheap.acceptance.accepted[n][:2] == [1, 0]


def test_a_round_without_copy_branches_never_reads_the_head_tree():
    class Unread:  # a device tree whose read would fail: only a walk may read it
        host = None

        @property
        def tokens(self):
            raise AssertionError("the tree was read")

    walk = held_prefix(Unread())  # what the engine builds every round, for NoCopy too
    with pytest.raises(AssertionError, match="the tree was read"):
        walk([1])


# ---------------------------------------------------------------- head-free rounds


def test_a_round_drafts_copies_alone_only_where_they_are_expected_to_commit_faster():
    """A strong match (4 tokens, the prior's 0.89-0.95 rates) skips the head where its round costs much more than a
    copy round; a 1-token match (right a quarter of the time) keeps it; so do equal round costs (the head only
    adds), and a budget without the head's figures (lookup, or no costs measured)."""
    costs = dict(head_held=(0.6, 0.35, 0.2), head_round_ms=120.0, node_ms=1.0, free_round_ms=80.0, free_node_ms=0.3,
                 min_accept=0.1)
    phrase = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    strong, weak = phrase + [1] + phrase[:4], phrase + [2, 3, 11]  # suffix [11..14] recurs; only [11] does
    for context, free in ((strong, True), (weak, False)):
        drafter = CopyDrafter(CopyConfig(**costs))
        drafter.begin(context)
        assert drafter.head_free() is free
    for cfg in (CopyConfig(**{**costs, "free_round_ms": 120.0, "free_node_ms": 1.0}), CopyConfig()):
        drafter = CopyDrafter(cfg)
        drafter.begin(strong)
        assert not drafter.head_free()
    drafter = CopyDrafter(CopyConfig(**costs))
    drafter.begin(strong)
    assert drafter.head_free()
    drafter.extend([99])  # a token that never occurred: no candidate, so nothing to draft without the head
    assert not drafter.round_candidates() and not drafter.head_free()


def test_choose_copy_gives_head_free_rounds_the_measured_costs_beside_a_head_only():
    verify = interpolate({1: 78.0, 8: 80.0, 24: 88.0, 48: 114.0})
    held = [0.6, 0.35, 0.2]
    chosen = choose_copy(verify, round_ms=120.0, nodes=24, held=held, free_round_ms=verify(1) + 5.0)
    assert chosen.head_held == tuple(held) and chosen.head_round_ms == 120.0 and chosen.free_round_ms == 83.0
    span = chosen.max_nodes
    assert chosen.node_ms == pytest.approx((verify(25 + span) - verify(25)) / span)
    assert chosen.free_node_ms == pytest.approx((verify(1 + span) - verify(1)) / span)
    assert "copies alone" in describe_copy(chosen)
    assert choose_copy(verify, round_ms=120.0, nodes=24, held=held).head_held == ()  # no free-round cost given
    assert choose_copy(verify, 80.0, 0, [], free_round_ms=83.0).head_held == ()  # lookup: no head to skip

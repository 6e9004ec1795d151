"""Acceptance rules: greedy equals plain greedy decoding; sampling reproduces the target distribution exactly."""
from __future__ import annotations

import math

import pytest
import torch

from nanospec_core.decoding.tree import DraftTree
from nanospec_core.decoding.verify import Acceptance, sample_token, verify_greedy, verify_sampling


def make_tree(parents: list[int], tokens: list[int]) -> DraftTree:
    """A DraftTree from parent indices (parents first); siblings' draft scores descend in listing order."""
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return DraftTree(tokens=torch.tensor(tokens, dtype=torch.long), parents=torch.tensor(parents, dtype=torch.long),
                     depths=torch.tensor(depths, dtype=torch.long),
                     scores=-0.1 * torch.arange(1, len(tokens) + 1, dtype=torch.float32))


def one_hot_logits(winners: list[int], vocab: int = 12) -> torch.Tensor:
    """[len(winners), vocab] logits whose row-wise argmax is `winners`."""
    logits = torch.randn(len(winners), vocab, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(len(winners)), torch.tensor(winners)] = 10.0
    return logits


def bigram_logits(tree: DraftTree, root_token: int, table: torch.Tensor) -> torch.Tensor:
    """Target logits [n+1, V] of a bigram model: the row of a verify index depends on its own token."""
    return table[torch.cat([torch.tensor([root_token]), tree.tokens])]


# ---------------------------------------------------------------- greedy

# verify index:   0     1      2      3      4      5      6
# node:         root  0:5    1:7    2:3    3:4    4:9    5:1      parents: 0,1 <- root; 2,3 <- 0; 4 <- 1; 5 <- 3
EXAMPLE = make_tree(parents=[-1, -1, 0, 0, 1, 3], tokens=[5, 7, 3, 4, 9, 1])


def test_greedy_follows_the_argmax_down_to_the_deepest_match():
    # argmax after: root 5 (node 0), node 0 -> 4 (node 3), node 3 -> 1 (node 5), node 5 -> 8 (bonus)
    logits = one_hot_logits([5, 0, 0, 0, 1, 0, 8])
    logits[[1, 4]] = one_hot_logits([4, 1])
    accepted = verify_greedy(EXAMPLE, logits)
    assert accepted == Acceptance(path=[0, 1, 4, 6], tokens=[5, 4, 1, 8], bonus=8)
    assert accepted.accept_len == 3


def test_greedy_stops_where_no_child_matches():
    logits = one_hot_logits([7, 0, 2, 0, 0, 0, 0])  # root -> 7 (node 1), node 1 -> 2: node 1's child is 9
    assert verify_greedy(EXAMPLE, logits) == Acceptance(path=[0, 2], tokens=[7, 2], bonus=2)
    logits = one_hot_logits([6, 0, 0, 0, 0, 0, 0])  # nothing drafted matches: only the bonus
    assert verify_greedy(EXAMPLE, logits) == Acceptance(path=[0], tokens=[6], bonus=6)


def test_greedy_on_a_root_only_tree_returns_the_argmax():
    empty = make_tree([], [])
    assert verify_greedy(empty, one_hot_logits([3])) == Acceptance(path=[0], tokens=[3], bonus=3)


@pytest.mark.parametrize("seed", range(20))
def test_greedy_equals_plain_greedy_decoding_on_random_trees(seed):
    gen = torch.Generator().manual_seed(seed)
    vocab, n = 4, 30  # a tiny vocabulary makes long matches and duplicate siblings common
    table = torch.randn(vocab, vocab, generator=gen)
    parents = [int(torch.randint(-1, i, (1,), generator=gen)) if i else -1 for i in range(n)]
    tree = make_tree(parents, torch.randint(0, vocab, (n,), generator=gen).tolist())
    root = 0
    accepted = verify_greedy(tree, bigram_logits(tree, root, table))

    plain = [root]  # plain greedy decoding from the root, long enough for any tree path
    for _ in range(tree.max_depth + 1):
        plain.append(int(table[plain[-1]].argmax()))
    assert accepted.tokens == plain[1:len(accepted.tokens) + 1]
    # ... and the accepted path is the longest tree path that plain greedy decoding agrees with
    tokens = tree.tokens.tolist()
    longest = max(len(p) - 1 for p in map(tree.path_to, range(n + 1))
                  if [tokens[v - 1] for v in p[1:]] == plain[1:len(p)])
    assert accepted.accept_len == longest


# ---------------------------------------------------------------- sampling

VOCAB, ROOT, TEMPERATURE = 6, 0, 0.8


def target_table(seed: int, mode_token: int | None = None) -> torch.Tensor:
    """[V, V] bigram logits; with mode_token, that token is the target's most likely next token everywhere."""
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if mode_token is not None:
        table[:, mode_token] = table.max(dim=1).values + 0.5
    return table


def exact_first_two(table: torch.Tensor) -> torch.Tensor:
    """[V, V] P(x1, x2) = p(x1 | root) p(x2 | x1) with p(. | a) = softmax(table[a] / T)."""
    probs = torch.softmax(table / TEMPERATURE, dim=-1)
    return probs[ROOT][:, None] * probs


def sample_first_two(tree: DraftTree, table: torch.Tensor, draws: int, seed: int, verifier=verify_sampling):
    """[V, V] counts of the first two tokens emitted by repeated verification rounds (the tree is redrafted
    unchanged each round; only the root token moves)."""
    gen = torch.Generator().manual_seed(seed)
    logits_at = {root: bigram_logits(tree, root, table).float() for root in range(VOCAB)}
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.long)
    for _ in range(draws):
        emitted, root = [], ROOT
        while len(emitted) < 2:
            tokens = verifier(tree, logits_at[root], TEMPERATURE, gen).tokens
            emitted += tokens
            root = tokens[-1]
        counts[emitted[0], emitted[1]] += 1
    return counts


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, float]:
    """Pearson statistic and its 1e-4 critical value (Wilson-Hilferty approximation, dof = bins - 1).

    Cells expecting fewer than 5 counts are pooled into one bin, the usual validity condition of the
    chi-square approximation. With the exact distribution a fresh seed fails this bound once in 10^4 runs;
    a biased acceptor (test_chi_square_bound_catches_a_biased_acceptor) exceeds it many times over.
    """
    observed, expected = counts.flatten().double(), expected_probs.flatten() * float(counts.sum())
    rare = expected < 5
    if bool(rare.any()):
        observed = torch.cat([observed[~rare], observed[rare].sum()[None]])
        expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof, z = expected.numel() - 1, 3.719  # z: standard normal 1 - 1e-4 quantile
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return statistic, critical


# three drafts for the same 2-level target; none of them is a good draft, and the output must not care
TYPICAL = make_tree(parents=[-1, -1, -1, 0, 0, 1], tokens=[1, 2, 3, 0, 4, 5])
WITHOUT_MODE = make_tree(parents=[-1, -1, 0, 0, 1, 2], tokens=[1, 2, 3, 4, 5, 1])  # never proposes token 0
DUPLICATES = make_tree(parents=[-1, -1, -1, 0, 0, 1], tokens=[2, 2, 4, 1, 1, 3])  # repeated sibling tokens

SCENARIOS = {"typical": (TYPICAL, target_table(1)), "never_the_mode": (WITHOUT_MODE, target_table(2, mode_token=0)),
             "duplicate_siblings": (DUPLICATES, target_table(3))}


@pytest.mark.parametrize("name", SCENARIOS)
def test_sampling_emits_exactly_the_target_distribution(name):
    tree, table = SCENARIOS[name]
    counts = sample_first_two(tree, table, draws=15_000, seed=11)
    statistic, critical = chi_square(counts, exact_first_two(table))
    assert statistic < critical, f"{name}: chi2 {statistic:.1f} >= {critical:.1f}"


def test_chi_square_bound_catches_a_biased_acceptor():
    """The statistical test has power: forgetting to remove rejected mass from the residual is detected."""

    def no_residual(tree, logits, temperature, gen):  # accept child c w.p. p(c), else bonus ~ p (wrong)
        node, path = 0, [0]
        while True:
            probs = torch.softmax(logits[node] / temperature, dim=-1)
            for child in tree.children()[node]:
                if float(torch.rand(1, generator=gen)) < float(probs[tree.tokens[child - 1]]):
                    path.append(child)
                    break
            else:
                bonus = int(torch.multinomial(probs, 1, generator=gen))
                return Acceptance(path, [int(tree.tokens[v - 1]) for v in path[1:]] + [bonus], bonus)
            node = path[-1]

    tree, table = SCENARIOS["typical"]
    counts = sample_first_two(tree, table, draws=5_000, seed=11, verifier=no_residual)
    statistic, critical = chi_square(counts, exact_first_two(table))
    assert statistic > 3 * critical


def test_sampling_is_reproducible_for_a_seed_and_greedy_at_zero_temperature():
    tree, table = SCENARIOS["typical"]
    logits = bigram_logits(tree, ROOT, table).float()
    first = [verify_sampling(tree, logits, 1.0, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert first[0] == first[1]
    assert verify_sampling(tree, logits, 0.0, None) == verify_greedy(tree, logits)


def test_sampling_accepts_a_drafted_point_mass_and_never_a_zero_probability_token():
    tree = make_tree(parents=[-1, -1, 0], tokens=[3, 4, 5])
    logits = torch.full((4, 8), -1e9)
    logits[0, 4] = 0.0  # the target is certain of token 4 (node 1) after the root ...
    logits[2, [1, 2]] = 0.0  # ... then splits between 1 and 2; the leaf row is never reached
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        accepted = verify_sampling(tree, logits, 1.0, gen)
        assert accepted.path == [0, 2] and accepted.tokens[0] == 4 and accepted.bonus in (1, 2)


def test_sample_token_follows_softmax_over_temperature_and_argmax_at_zero():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])
    assert sample_token(logits, 0.0, None) == 2
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_token(logits, 1.5, gen) for _ in range(20_000)]), minlength=5)
    statistic, critical = chi_square(counts[None], torch.softmax(logits.double() / 1.5, dim=-1)[None])
    assert statistic < critical

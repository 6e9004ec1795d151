"""The tree chooser: expected committed tokens from measured ranks, and the tree of highest expected tokens/s."""
import numpy as np
import pytest

from nanospec_core.decoding.tree_choice import (best_widths, choose_tree, expected_committed, interpolate,
                                                load_acceptance, save_acceptance)


def synthetic_ranks(p_first: float, positions: int = 4000, depth: int = 8, seed: int = 0) -> np.ndarray:
    """A head whose true token is its first guess with probability p_first, else rank 1, 2, ... geometrically."""
    rng = np.random.default_rng(seed)
    return np.minimum(rng.geometric(p_first, size=(positions, depth)) - 1, 16)


def test_expected_committed_counts_the_bonus_and_stops_at_the_first_miss():
    ranks = [[0, 0], [0, 1], [1, 0], [3, 3]]
    assert expected_committed(ranks, (1, 1)) == pytest.approx(1 + 2 / 4 + 1 / 4)
    assert expected_committed(ranks, (2, 2)) == pytest.approx(1 + 3 / 4 + 3 / 4)
    assert expected_committed(ranks, (4, 4)) == pytest.approx(3.0)
    assert expected_committed(ranks, ()) == 1.0


def test_greedy_widths_grow_by_one_node_and_never_lose():
    ranks = synthetic_ranks(0.5)
    steps = best_widths(ranks, depth=4, top_k=3, total=12)
    assert [sum(w) for w, _ in steps] == list(range(1, 13))
    values = [v for _, v in steps]
    assert values == sorted(values) and all(max(w) <= 3 for w, _ in steps)
    for widths, _ in steps:  # ancestor-closed: a depth holds nodes only under a non-empty depth above
        assert all(widths[d] == 0 or widths[d - 1] > 0 for d in range(1, 4))


def test_flat_verify_cost_and_a_strong_head_choose_a_deep_wide_tree():
    ranks = synthetic_ranks(0.8)
    choice = choose_tree(ranks, verify_ms=lambda n: 10.0, level_ms=lambda rows: 0.1)
    assert choice.tree.depth >= 6 and choice.tree.total_tokens >= 20
    assert choice.expected_tau > 4


def test_steep_verify_cost_and_a_weak_head_choose_a_small_tree():
    ranks = synthetic_ranks(0.3)
    steep = choose_tree(ranks, verify_ms=lambda n: 80.0 + 12.0 * n, level_ms=lambda rows: 5.0 + rows)
    flat = choose_tree(ranks, verify_ms=lambda n: 80.0 + 0.2 * n, level_ms=lambda rows: 5.0 + rows)
    assert steep.tree.total_tokens <= 4 < flat.tree.total_tokens
    assert steep.expected_tokens_per_s == pytest.approx(
        1e3 * steep.expected_tau / (steep.draft_ms + steep.verify_ms))


def test_the_choice_maximises_the_documented_objective_over_a_small_grid():
    ranks = synthetic_ranks(0.5, positions=500, depth=3)
    verify, level = (lambda n: 50.0 + 4.0 * n), (lambda rows: 3.0 + 0.5 * rows)
    choice = choose_tree(ranks, verify, level, max_depth=3, max_top_k=3, max_total=9)
    for depth in range(1, 4):
        for top_k in range(1, 4):
            for n, (widths, tau) in enumerate(best_widths(ranks, depth, top_k, 9), start=1):
                speed = 1e3 * tau / (level(2) + depth * level(top_k) + verify(n + 1))
                assert speed <= choice.expected_tokens_per_s + 1e-9


def test_acceptance_round_trips_through_the_head_folder(tmp_path):
    ranks = synthetic_ranks(0.4, positions=50, depth=5)
    assert load_acceptance(tmp_path) is None and load_acceptance(None) is None
    save_acceptance(tmp_path, ranks, {"command": "test"})
    np.testing.assert_array_equal(load_acceptance(tmp_path), ranks)


def test_interpolation_passes_through_the_points_and_extends_the_last_slope():
    cost = interpolate({1: 10.0, 8: 24.0, 16: 40.0})
    assert cost(1) == 10.0 and cost(8) == 24.0 and cost(4) == pytest.approx(16.0)
    assert cost(24) == pytest.approx(56.0)

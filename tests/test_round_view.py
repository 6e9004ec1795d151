"""The round view and the locality tab's data: which round is drawn, EAGLE's round at the same position, the miss
marked, the origin shares, and the growth chart on a scale where both lines read."""
import pytest

from nanospec_core.compare import RunTrace
from nanospec_core.views.locality_view import growth_figure, origin_shares
from nanospec_core.metrics import StepStats, TreeView
from nanospec_core.views.round_view import drafted_rounds, round_view, starts


def step(round_, tokens, tree_path, hits=None, origins=None, active=300):
    """A round that committed `tokens`: the first len(tree_path) accepted from a 3-node tree, the last the bonus."""
    tree = TreeView(tokens=[*tokens[:-1], 77, 78][:3], parents=[-1, 0, -1], scores=[-0.1, -0.5, -2.0],
                    path=tree_path, bonus=tokens[-1])
    return StepStats(round=round_, tokens=tokens, accepted=len(tokens), tree_size=3, active_vocab=active,
                     hits=hits, origins=origins, draft_ms=4.0, backbone_ms=1.0, lm_head_ms=0.5, tree=tree)


def run(method, rounds) -> RunTrace:
    trace = RunTrace(method, steps=[StepStats(round=0, tokens=[5], accepted=1)] + rounds)
    trace.token_ids = [t for s in trace.steps for t in s.tokens]
    return trace


# NanoSpec: round 1 commits [10, 11, 12] (2 accepted + bonus 12, a miss), round 2 commits [13] (bonus only, a hit)
NANOSPEC = run("nanospec", [step(1, [10, 11, 12], [0, 1], hits=[True, True, False], origins=["prompt", "output", ""]),
                            step(2, [13], [], hits=[True], origins=["prompt-topk"])])
# EAGLE: round 1 commits [10] only, so its round 2 starts at position 2, where NanoSpec has no round; its round 3
# starts at 4, where NanoSpec's round 2 starts
EAGLE = run("eagle", [step(1, [10], []), step(2, [11, 12], [0]), step(3, [13], [])])


def decode(ids):
    return "".join(f"<{i}>" for i in ids)


def test_rounds_are_found_by_the_position_they_start_at():
    assert drafted_rounds(NANOSPEC) == [1, 2]
    assert {p: s.round for p, s in starts(NANOSPEC).items()} == {1: 1, 4: 2}
    assert {p: s.round for p, s in starts(EAGLE).items()} == {1: 1, 2: 2, 4: 3}


def test_the_view_pairs_eagles_round_at_the_same_position_and_names_the_miss():
    view = round_view(NANOSPEC, EAGLE, 1, decode, full_vocab=151_936)
    assert view.round == 1 and view.eagle_figure is not None
    assert "Miss:" in view.details and "'<12>' was not in the active set" in view.details
    assert "300 active ids of 151,936" in view.details and "2 accepted" in view.details
    bonus = next(t for t in view.nanospec_figure.data if t.name and t.name.startswith("bonus"))
    assert "miss" in bonus.name and bonus.text[-1] == "<12>"
    accepted = next(t for t in view.nanospec_figure.data if t.name == "accepted")
    assert list(accepted.text) == ["<10>", "<11>"]


def test_a_round_eagle_did_not_start_at_the_same_place_is_said_so():
    view = round_view(NANOSPEC, EAGLE, 2, decode)
    assert view.eagle_figure is not None and "EAGLE's round 3" in view.details  # both start at token 4
    shifted = run("eagle", [step(1, [10, 11], [0]), step(2, [12, 13], [0])])  # starts at 1 and 3
    view = round_view(NANOSPEC, shifted, 2, decode)
    assert view.eagle_figure is None and "EAGLE has no round starting at output token 4" in view.details
    assert "Miss" not in view.details and "from: prompt top-k" in view.details  # the bonus was active


def test_the_round_number_is_clamped_and_an_empty_run_is_an_error():
    assert round_view(NANOSPEC, None, 99, decode).round == 2 and round_view(NANOSPEC, None, -3, decode).round == 1
    with pytest.raises(ValueError, match="no drafted round"):
        round_view(run("nanospec", []), None, 1, decode)


def test_origin_shares_count_committed_tokens_by_origin_and_misses_last():
    table = origin_shares(NANOSPEC)
    assert list(table.origin) == ["prompt", "prompt top-k", "earlier output", "miss"]
    assert list(table.tokens) == [1, 1, 1, 1] and table.share.sum() == pytest.approx(1.0)


def test_growth_chart_is_on_a_log_axis_under_the_full_vocabulary():
    fig = growth_figure(NANOSPEC, max_new_tokens=16, full_vocab=151_936)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.range[1] > 5.18  # log10(151,936) = 5.18
    names = [t.name for t in fig.data]
    assert names[0].startswith("active set") and names[1] == "distinct ids in the output"
    assert list(fig.data[1].y) == [4, 5]  # distinct ids after each round: {5, 10, 11, 12}, then 13

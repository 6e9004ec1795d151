"""The offline locality replay: a token is covered only by information from earlier positions."""
from nanospec_core.bench.locality import Replay, Sources, compare_sources, coverage


def replay():
    # prompt [10, 11]; output [12, 10, 13, 12]; topk[p] predicts ids[p + 1]
    ids = [10, 11, 12, 10, 13, 12]
    topk = [[20, 21], [12, 22], [23, 13], [13, 24], [25, 26], [27, 28]]
    return Replay(prompt_len=2, ids=ids, topk=topk, category="x")


def test_prompt_topk_output_tokens_and_delayed_output_topk():
    r = replay()
    # no top-k at all: 12 miss, 10 hit (prompt), 13 miss, 12 hit (earlier output)
    assert coverage(r, Sources(prompt_topk=0, output_topk=0))[:2] == (2, 4)
    # prompt top-2 adds 12 (topk[1]) -> 12 hit; 13 is in topk[2] = position j - 2 for j = 4 -> hit
    assert coverage(r, Sources(prompt_topk=2, output_topk=2))[:2] == (4, 4)
    # 13 is in topk[3] too, but that list predicts token 4 itself: too late, so top-k at output must be used
    assert coverage(r, Sources(prompt_topk=2, output_topk=0))[:2] == (3, 4)


def test_static_core_and_specials_are_always_active():
    r = replay()
    hits, total, active = coverage(r, Sources(prompt_topk=0, output_topk=0, static_core=1), core=[13])
    assert (hits, total) == (3, 4) and active >= 3


def test_compare_sources_reports_each_candidate():
    rows = compare_sources([replay()], [Sources(0, 0), Sources(2, 2)])
    assert [round(row["coverage"], 2) for row in rows] == [0.5, 1.0]
    assert rows[0]["avg_active"] < rows[1]["avg_active"]

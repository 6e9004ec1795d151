"""Why speculation pays or not: the break-even tau, the forecast before a run, the panel's arithmetic, the cost
model against measured rounds, and plain methods that need no head."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from nanospec_core.bench.cost_check import cost_table, measured_plain_ms, measured_rounds
from nanospec_core.compare import RunTrace
from nanospec_core.config import TreeConfig
from nanospec_core.decoding.tree_choice import TreeChoice, choose_tree, interpolate, predict
from nanospec_core.metrics import StepStats
from nanospec_core.views.ui import forecast
from nanospec_core.views.why import lane_cost, why_lines, why_markdown


def lane(method, rounds, accepted, draft_ms, verify_ms, extra_ms=0.0, active=None):
    trace = RunTrace(method)
    trace.steps = [StepStats(round=0, tokens=[1], accepted=1, prefill_ms=50.0)]
    trace.steps += [StepStats(round=r, tokens=[2] * accepted, accepted=accepted, tree_size=6, draft_ms=draft_ms,
                              verify_ms=verify_ms, active_vocab=active) for r in range(1, rounds + 1)]
    trace.token_ids = [t for s in trace.steps for t in s.tokens]
    trace.wall_s = (50.0 + rounds * (draft_ms + verify_ms + extra_ms)) / 1e3
    trace.finished = True
    return trace


def avx2_like():
    """The AVX2 EPYC of the issue: plain 135 ms/token; a round of 41 ms draft + 361 ms verify committing 1.8."""
    return [lane("vanilla", 40, 1, 0.0, 135.0), lane("eagle", 20, 2, 250.0, 361.0),
            lane("nanospec", 20, 2, 41.0, 361.0, extra_ms=0.0, active=1400)]


def test_break_even_tau_is_round_cost_over_a_plain_step():
    choice = TreeChoice(TreeConfig(depth=3, top_k=3, total_tokens=7), 1.85, 6.2, 40.0, 259.0, "x", plain_ms=135.0)
    assert choice.round_ms == 299.0 and choice.break_even_tau == pytest.approx(299 / 135)
    assert choice.pays is False and choice.to_json()["pays"] is False
    assert TreeChoice(choice.tree, 2.5, 8.4, 40.0, 259.0, "x", plain_ms=135.0).pays is True
    assert "no speedup here" in forecast(choice) and "2.21 tokens" in forecast(choice)
    assert forecast(TreeChoice.fixed(TreeConfig(), "no table")) == ""  # nothing measured: nothing forecast


def test_the_chooser_says_when_no_tree_beats_plain_decoding():
    ranks = [[0, 0], [0, 1], [1, 0], [3, 3]] * 5
    cheap = choose_tree(__import__("numpy").array(ranks), interpolate({1: 10.0, 64: 12.0}), lambda rows: 1.0)
    assert cheap.pays and "no tree beats" not in cheap.reason
    costly = choose_tree(__import__("numpy").array(ranks), interpolate({1: 10.0, 2: 30.0, 64: 400.0}),
                         lambda rows: 5.0)
    assert costly.pays is False and "no tree beats plain decoding here" in costly.reason


def test_predict_gives_the_chooser_figures_for_its_own_tree():
    import numpy as np

    ranks = np.array([[0, 0], [0, 1], [1, 0], [3, 3]] * 5)
    verify, level = interpolate({1: 10.0, 8: 14.0, 64: 40.0}), (lambda rows: 1.0 + rows / 10)
    chosen = choose_tree(ranks, verify, level)
    again = predict(ranks, verify, level, chosen.tree)
    assert again.expected_tau == pytest.approx(chosen.expected_tau) and again.round_ms == pytest.approx(chosen.round_ms)


def test_the_panel_explains_a_machine_where_speculation_loses():
    text = "\n".join(why_lines(avx2_like(), verify_curve={1: 135.0, 8: 361.0, 16: 600.0}, vocab_size=151936))
    assert "135 ms a token" in text
    assert "a round costs 402 ms (draft 41, verify 361, bookkeeping 0) = 2.98 plain steps" in text
    assert "0.67x plain" in text and "needs 2.98 tokens to break even" in text
    assert "a verify of 8 tokens costs 2.7 plain steps" in text
    assert "NanoSpec's draft is 0.16x EAGLE's" in text and "1,400 rows instead of 151,936" in text
    # the head commits 2 a round, draft + bookkeeping cost 0.30 plain steps: a verify under 1.70 steps would pay
    assert "costs under 1.70 plain steps" in text and "1.53x plain" in text


def test_the_panel_says_when_no_verify_could_make_the_head_pay():
    traces = [lane("vanilla", 10, 1, 0.0, 10.0), lane("nanospec", 10, 1, 8.0, 20.0, extra_ms=4.0)]
    text = "\n".join(why_lines(traces))
    assert "Even a verify as cheap as one plain step would not pay" in text and "more than 2.20 tokens" in text


def test_the_panel_shows_the_prediction_next_to_the_measurement():
    choice = TreeChoice(TreeConfig(depth=3, top_k=3, total_tokens=7), 1.85, 6.19, 40.0, 259.0, "x", plain_ms=135.0)
    text = why_markdown(avx2_like(), choice, machine="AMD EPYC")
    assert text.startswith("### Why this speed (AMD EPYC)")
    assert "predicted 6.2 tok/s for this tree (1.85 tokens per 299 ms round" in text
    assert "measured: " in text and "per 402 ms round" in text


def test_without_a_plain_lane_the_panel_says_what_it_needs():
    assert "plain lane" in why_lines([lane("nanospec", 3, 2, 5.0, 10.0)])[0]


def test_lane_cost_counts_bookkeeping_in_the_round():
    cost = lane_cost(lane("nanospec", 4, 2, 5.0, 10.0, extra_ms=3.0))
    assert cost.round_ms == pytest.approx(18.0) and cost.other_ms == pytest.approx(3.0) and cost.tau == 2


def bench_rows():
    """Recorded per-prompt rows as the benchmark writes them (two prompts; times in s)."""
    row = lambda method, rounds, wall, prefill, draft, verify, tau, tokens: {  # noqa: E731
        "method": method, "rounds": rounds, "wall_s": wall, "prefill_s": prefill, "draft_s": draft,
        "verify_s": verify, "tau": tau, "accept_lengths": [tau] * rounds if rounds else [], "new_tokens": tokens}
    return pd.DataFrame([row("hf", 0, 2.0, 2.0, 0, 0, None, 20), row("hf", 0, 2.2, 2.2, 0, 0, None, 22),
                         row("nanospec", 10, 3.1, 0.1, 0.5, 2.0, 2, 21), row("nanospec", 10, 3.2, 0.2, 0.6, 2.0, 2, 21)])


def test_the_cost_table_sets_the_prediction_beside_the_measured_rounds():
    rows = bench_rows()
    measured = measured_rounds(rows, "nanospec")
    assert measured["round_ms"] == pytest.approx(300.0) and measured["tau"] == 2
    assert measured_plain_ms(rows) == pytest.approx(4200 / 42)  # hf reports one block: wall over tokens
    prediction = {"round_ms": 250.0, "draft_ms": 50.0, "verify_ms": 200.0, "expected_tau": 2.2,
                  "expected_tokens_per_s": 8.8, "plain_ms": 90.0}
    table = cost_table(rows, prediction).set_index("quantity")
    assert table.loc["round ms (draft + verify + bookkeeping)", "measured / predicted"] == pytest.approx(1.2)
    assert table.loc["plain step ms", "measured"] == pytest.approx(100.0)
    assert cost_table(rows, None).empty


def test_plain_methods_run_on_a_model_without_a_head(capsys, tiny_model_dir):
    """generate --method hf / vanilla on a local folder that ships no head: nothing drafts, nothing needs a head."""
    from nanospec_core.__main__ import main

    for method in ("hf", "vanilla"):
        code = main(["generate", "--model", tiny_model_dir, "--method", method, "--dtype", "float32",
                     "--prompt", "write python code", "--max-new-tokens", "6", "--json"])
        out = json.loads(capsys.readouterr().out)
        assert code == 0 and out["summary"]["new_tokens"] == 6 and out["tree"] is None
    assert main(["generate", "--model", tiny_model_dir, "--method", "nanospec", "--dtype", "float32",
                 "--prompt", "x", "--max-new-tokens", "4", "--json"]) == 2  # a drafting method still needs one
    assert "no EAGLE head ships" in capsys.readouterr().err

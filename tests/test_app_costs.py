"""views/app_costs: the forecast learns what rounds cost inside the app (measured / predicted), kept per machine."""
from __future__ import annotations

import pytest

from nanospec_core.compare import RunTrace
from nanospec_core.config import TreeConfig
from nanospec_core.decoding.tree_choice import TreeChoice
from nanospec_core.metrics import StepStats
from nanospec_core.views import app_costs
from nanospec_core.views.why import lane_cost, prediction_lines

KEY = "test machine | model | bfloat16"


def trace(method: str, round_ms: float, rounds: int = 10, prefill_ms: float = 500.0) -> RunTrace:
    """A finished lane whose own time is the prefill plus `rounds` rounds of `round_ms` each."""
    t = RunTrace(method)
    t.steps = [StepStats(round=0, tokens=[1], accepted=1, prefill_ms=prefill_ms)]
    t.steps += [StepStats(round=r, tokens=[2, 3], accepted=2, verify_ms=round_ms) for r in range(1, rounds + 1)]
    t.wall_s = (prefill_ms + rounds * round_ms) / 1e3
    t.finished = True
    return t


def prediction(plain_ms=80.0, draft=30.0, verify=100.0, overhead=10.0, tau=2.5) -> TreeChoice:
    return TreeChoice(TreeConfig(), tau, 1e3 * tau / (draft + verify + overhead), draft, verify, "test",
                      plain_ms=plain_ms, overhead_ms=overhead)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSPEC_CACHE", str(tmp_path))


def test_a_round_time_leaves_the_prefill_out():
    assert app_costs.measured_round_ms(trace("vanilla", 90.0)) == pytest.approx(90.0)


def test_without_runs_the_forecast_is_the_cost_model_s():
    p = prediction()
    assert app_costs.corrected(p, app_costs.load(KEY)) is p


def test_finished_runs_scale_the_next_forecast_by_their_median_ratio():
    p = prediction()  # plain 80 ms, round 140 ms
    for plain, round_ in ((100.0, 175.0), (96.0, 168.0), (400.0, 700.0)):  # x1.25, x1.2, one odd run x5
        ratios = app_costs.record(KEY, trace("vanilla", plain), trace("nanospec", round_), p)
    assert ratios["plain"] == [1.25, 1.2, 5.0]
    fixed = app_costs.corrected(p, app_costs.load(KEY))  # read back from the cache: a restart keeps it
    assert fixed.plain_ms == pytest.approx(80 * 1.25) and fixed.round_ms == pytest.approx(140 * 1.25)
    assert fixed.expected_tau == p.expected_tau  # tau is the head's, not the machine's
    assert fixed.expected_tokens_per_s == pytest.approx(1e3 * 2.5 / 175.0)
    assert "x1.25" in fixed.correction and "last 3 runs" in fixed.correction
    assert app_costs.load("another machine") == {"plain": [], "round": []}


def test_only_the_last_runs_count():
    p = prediction()
    for _ in range(app_costs.KEEP + 3):
        app_costs.record(KEY, trace("vanilla", 80.0), trace("nanospec", 140.0), p)
    assert app_costs.load(KEY)["round"] == [1.0] * app_costs.KEEP


def test_a_run_without_rounds_or_prediction_teaches_nothing():
    empty = RunTrace("nanospec")
    assert app_costs.record(KEY, trace("vanilla", 80.0), empty, prediction()) == {"plain": [], "round": []}
    assert app_costs.record(KEY, trace("vanilla", 80.0), trace("nanospec", 1.0), None) == {"plain": [], "round": []}


def test_the_why_panel_says_the_forecast_was_corrected():
    p = prediction()
    app_costs.record(KEY, trace("vanilla", 100.0), trace("nanospec", 175.0), p)
    lane = lane_cost(trace("nanospec", 175.0))
    line = prediction_lines(lane, 100.0, app_costs.corrected(p, app_costs.load(KEY)))[0]
    assert "x1.25 (plain step)" in line and "1 runs" in line
    assert "forecast used" not in prediction_lines(lane, 100.0, p)[0]

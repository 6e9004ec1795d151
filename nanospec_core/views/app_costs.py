"""What rounds cost inside the app against what the cost model predicts, learned from the app's own finished runs.

The tree chooser's costs are measured outside any server (profiling.py: one forward at a fixed context, plus the
round overhead of one short decode). Inside the app the same rounds can cost more: a longer context, three lanes
alternating over one cache hierarchy, the server's own work between rounds. So every finished comparison records
two ratios, measured / predicted, for the plain step (the plain lane) and for the NanoSpec round (its lane), and the
forecast shown before the next run scales the model's costs by the median of the last KEEP runs:

    plain_ms' = plain_ms * f_plain          round_ms' = round_ms * f_round          tok/s' = tau * 1000 / round_ms'

tau stays the model's (it comes from the head's acceptance table, not from this machine). The ratios are cached
beside the cost curves (cache.py), keyed like them and by the lane's method, so a restart keeps them and other
hardware starts afresh.
"""
from __future__ import annotations

import dataclasses
import statistics

from ..cache import cache_dir
from .why import lane_cost

KEEP = 8  # runs whose ratios are kept: the median of a few resists one odd run (a first load, a busy machine)
FILE = "app_costs.json"


def measured_round_ms(trace) -> float | None:
    """A lane's own time per round, its prefill left out (None before its first round)."""
    cost = lane_cost(trace)
    return cost.round_ms if cost else None


def key(session, method: str) -> str:
    """Ratios are kept per machine, model, dtype (the session's cost key) and per speculative lane method: copy
    branches change what a round costs."""
    return f"{session.costs_key()}|{method}"


def load(key: str) -> dict[str, list[float]]:
    from ..machine import read_cache

    entry = read_cache(cache_dir() / FILE).get(key, {})
    return {"plain": list(entry.get("plain", [])), "round": list(entry.get("round", []))}


def record(key: str, plain_trace, spec_trace, prediction) -> dict[str, list[float]]:
    """Add one finished run's measured / predicted ratios (a lane with no rounds adds nothing); returns them all."""
    from ..machine import read_cache, write_cache

    path = cache_dir() / FILE
    entries = read_cache(path)
    ratios = load(key)
    plain, round_ = measured_round_ms(plain_trace), measured_round_ms(spec_trace)
    if prediction is None or not prediction.plain_ms or prediction.round_ms is None or not plain or not round_:
        return ratios
    ratios["plain"] = (ratios["plain"] + [round(plain / prediction.plain_ms, 4)])[-KEEP:]
    ratios["round"] = (ratios["round"] + [round(round_ / prediction.round_ms, 4)])[-KEEP:]
    entries[key] = ratios
    write_cache(path, entries)
    return ratios


def corrected(prediction, ratios: dict[str, list[float]]):
    """The prediction with its costs scaled by the median measured / predicted ratios (unchanged without any)."""
    if prediction is None or prediction.round_ms is None or not ratios["plain"] or not ratios["round"]:
        return prediction
    f_plain, f_round = statistics.median(ratios["plain"]), statistics.median(ratios["round"])
    draft, verify, overhead = (prediction.draft_ms * f_round, prediction.verify_ms * f_round,
                               prediction.overhead_ms * f_round)
    return dataclasses.replace(
        prediction, draft_ms=draft, verify_ms=verify, overhead_ms=overhead, plain_ms=prediction.plain_ms * f_plain,
        expected_tokens_per_s=1e3 * prediction.expected_tau / (draft + verify + overhead),
        correction=f"the cost model's costs x{f_plain:.2f} (plain step) and x{f_round:.2f} (round), the median of what "
               f"the app measured against it in its last {len(ratios['round'])} runs here")


def forecast_for(session, tree, method: str):
    """The cost model's prediction for `tree` in this session, corrected by the app's `method` lane's runs here."""
    return corrected(session.tree_prediction(tree), load(key(session, method)))

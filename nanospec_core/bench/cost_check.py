"""The tree chooser's cost model against the rounds a benchmark measured: is the prediction right on this machine?

The chooser (decoding/tree_choice.py) predicts, for the tree it picks, the draft and verify milliseconds of a round,
the tokens a round commits (tau) and so tokens/s, and a plain decoding step's cost. A benchmark measures all of
them: a drafting method's rounds (wall time between rounds, prefill left out, so the engine's own bookkeeping
counts), and a plain method's milliseconds per token. This table sets them side by side; a ratio far from 1 is a
biased model, and the round calibration (profiling.round_offsets) is what corrects it.
"""
from __future__ import annotations

import pandas as pd

PLAIN_METHODS = ("vanilla", "hf")  # one target forward per token: their ms/token is the measured plain step


def measured_rounds(per_prompt: pd.DataFrame, method: str) -> dict | None:
    """A drafting method's measured round over all its prompts: ms per round (wall, prefill out), draft, verify,
    the rest, tau, and tokens/s."""
    m = per_prompt[(per_prompt.method == method) & (per_prompt.rounds > 0)]
    if m.empty or not m.tau.notna().any():
        return None
    rounds = m.rounds.sum()
    decode_s = (m.wall_s - m.prefill_s).sum()
    return {"round_ms": 1e3 * decode_s / rounds, "draft_ms": 1e3 * m.draft_s.sum() / rounds,
            "verify_ms": 1e3 * m.verify_s.sum() / rounds,
            "tau": sum(map(sum, m.accept_lengths)) / rounds, "tokens_per_s": m.new_tokens.sum() / m.wall_s.sum()}


def measured_plain_ms(per_prompt: pd.DataFrame) -> float | None:
    """ms per new token of the first plain method in the run (prefill out)."""
    for method in PLAIN_METHODS:
        m = per_prompt[per_prompt.method == method]
        if m.empty or m.new_tokens.sum() <= len(m):
            continue
        decode_s = (m.wall_s - m.prefill_s).sum()
        if decode_s > 0.05 * m.wall_s.sum():  # the first token comes with the prefill: new_tokens - 1 steps
            return 1e3 * decode_s / (m.new_tokens.sum() - len(m))
        return 1e3 * m.wall_s.sum() / m.new_tokens.sum()  # hf reports one block: its prefill counted in
    return None


def cost_table(per_prompt: pd.DataFrame, prediction: dict | None, method: str = "nanospec") -> pd.DataFrame:
    """Predicted vs measured, one row per quantity, for `method` at the tree the prediction is for."""
    if prediction is None or prediction.get("round_ms") is None or per_prompt.empty:
        return pd.DataFrame()
    measured = measured_rounds(per_prompt, method) or {}
    plain = measured_plain_ms(per_prompt)
    pairs = [("round ms (draft + verify + bookkeeping)", prediction["round_ms"], measured.get("round_ms")),
             ("draft ms", prediction["draft_ms"], measured.get("draft_ms")),
             ("verify ms", prediction["verify_ms"], measured.get("verify_ms")),
             ("tau (tokens per round)", prediction["expected_tau"], measured.get("tau")),
             (f"{method} tokens/s", prediction["expected_tokens_per_s"], measured.get("tokens_per_s")),
             ("plain step ms", prediction.get("plain_ms"), plain)]
    rows = [{"quantity": name, "predicted": p, "measured": m, "measured / predicted": m / p if p and m else None}
            for name, p, m in pairs if p is not None]
    return pd.DataFrame(rows)

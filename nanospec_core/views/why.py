"""'Why this speed': the break-even arithmetic of one comparison, from this run's rounds and this machine's cost curve.

Plain decoding makes one token per target forward: plain_ms. A speculative round costs round_ms (draft + verify +
the engine's bookkeeping) and commits tau tokens, so it beats plain decoding exactly when

    tau > round_ms / plain_ms            (the break-even tau)

and its speedup is tau * plain_ms / round_ms. On a 2-core CPU a verify of n tokens costs several plain steps
(compute-bound), on a GPU about one (memory-bound): that single ratio decides where a given head pays. Every number
in the panel comes from the lanes that just ran, or from the cost curve this machine measured for the tree chooser.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..compare import RunTrace


LANE_LABELS = {"eagle": "EAGLE", "eagle+copy": "EAGLE + copies", "lookup": "Copy lookup (no head)",
               "nanospec": "EAGLE + NanoSpec", "nanospec+copy": "EAGLE + NanoSpec + copies"}


@dataclass
class LaneCost:
    method: str
    rounds: int
    tau: float
    draft_ms: float
    verify_ms: float
    round_ms: float  # wall time per round with the prefill left out: bookkeeping included
    tokens_per_s: float
    active_vocab: float | None

    @property
    def other_ms(self) -> float:
        return max(0.0, self.round_ms - self.draft_ms - self.verify_ms)


def lane_cost(trace: RunTrace) -> LaneCost | None:
    rounds = trace.rounds
    if not rounds:
        return None
    prefill_s = sum(s.prefill_ms for s in trace.steps) / 1e3
    summary = trace.summary()
    return LaneCost(trace.method, len(rounds), sum(s.accepted for s in rounds) / len(rounds),
                    sum(s.draft_ms for s in rounds) / len(rounds), sum(s.verify_ms for s in rounds) / len(rounds),
                    1e3 * max(trace.wall_s - prefill_s, 0.0) / len(rounds), summary.tokens_per_s,
                    summary.avg_active_vocab)


def plain_step_ms(trace: RunTrace | None) -> float | None:
    """The plain lane's measured cost of one token (its rounds are single forwards)."""
    if trace is None or not trace.rounds:
        return None
    return sum(s.verify_ms for s in trace.rounds) / len(trace.rounds)


def why_lines(traces: list[RunTrace], choice=None, verify_curve: dict[int, float] | None = None,
              vocab_size: int | None = None) -> list[str]:
    """The panel's sentences (markdown), each backed by a number of this run or of this machine's cost curve."""
    by_method = {t.method: t for t in traces}
    plain = plain_step_ms(by_method.get("vanilla"))
    if plain is None or plain <= 0:
        return ["Run the plain lane too: every figure here is relative to one plain decoding step."]
    lines = [f"**Plain decoding** costs **{plain:.0f} ms a token** here (one target forward each, measured in this "
             f"run: {1e3 / plain:.1f} tok/s)."]
    lanes = [cost for cost in (lane_cost(by_method[m]) for m in LANE_LABELS if m in by_method) if cost]
    for lane in lanes:
        label = LANE_LABELS[lane.method]
        even = lane.round_ms / plain
        verdict = (f"**{lane.tau / even:.2f}x plain**: it commits more than the {even:.2f} a round needs"
                   if lane.tau > even else
                   f"**{lane.tau / even:.2f}x plain**: a round needs {even:.2f} tokens to break even here")
        lines.append(f"**{label}**: a round costs {lane.round_ms:.0f} ms (draft {lane.draft_ms:.0f}, verify "
                     f"{lane.verify_ms:.0f}, bookkeeping {lane.other_ms:.0f}) = {even:.2f} plain steps, and commits "
                     f"tau = {lane.tau:.2f} tokens: {verdict}." + copy_clause(by_method[lane.method]))
    eagle = next((lane for lane in lanes if lane.method.startswith("eagle")), None)
    nano = next((lane for lane in lanes if lane.method.startswith("nanospec")), None)
    if eagle is not None and nano is not None and eagle.draft_ms > 0:
        rows = f"{nano.active_vocab:,.0f} rows" if nano.active_vocab else "its active rows"
        full = f" instead of {vocab_size:,}" if vocab_size else ""
        lines.append(f"NanoSpec's draft is {nano.draft_ms / eagle.draft_ms:.2f}x EAGLE's ({nano.draft_ms:.0f} vs "
                     f"{eagle.draft_ms:.0f} ms): its lm head scores {rows}{full}.")
    if nano is not None:
        lines += prediction_lines(nano, plain, choice)
        lines += where_it_pays(nano, plain, verify_curve)
    return lines


def copy_clause(trace: RunTrace) -> str:
    """What copy branches cost and gave per round: their extra verify nodes and the tokens only they proposed."""
    rounds = trace.rounds
    nodes = sum(s.copy_nodes for s in rounds)
    if not rounds or not nodes:
        return ""
    copied = sum(s.copy_accepted for s in rounds)
    return (f" Its copy branches added {nodes / len(rounds):.1f} verify nodes a round and committed "
            f"{copied / len(rounds):.2f} tokens a round that the head had not drafted ({copied / nodes:.0%} of "
            f"the copied nodes).")


def prediction_lines(lane: LaneCost, plain: float, choice) -> list[str]:
    if choice is None or choice.round_ms is None:
        return []
    return [f"The tree chooser predicted {choice.expected_tokens_per_s:.1f} tok/s for this tree ({choice.expected_tau:.2f} "
            f"tokens per {choice.round_ms:.0f} ms round, plain {choice.plain_tokens_per_s:.1f} tok/s); measured: "
            f"{lane.tokens_per_s:.1f} tok/s ({lane.tau:.2f} tokens per {lane.round_ms:.0f} ms round, plain "
            f"{1e3 / plain:.1f} tok/s)." + (f" The forecast used {choice.correction}." if choice.correction else "")]


def where_it_pays(lane: LaneCost, plain: float, verify_curve: dict[int, float] | None) -> list[str]:
    """What would have to change for this head to pay: the verify's cost in plain steps, or tau."""
    lines = []
    nodes = None
    if verify_curve and 1 in verify_curve:
        sizes = sorted(n for n in verify_curve if n > 1)
        if sizes:
            nodes = min(sizes, key=lambda n: abs(verify_curve[n] - lane.verify_ms))
            lines.append(f"On this machine a verify of {nodes} tokens costs {verify_curve[nodes] / verify_curve[1]:.1f} "
                         f"plain steps (its measured cost curve): drafting more tokens per round costs more here.")
    fixed = (lane.draft_ms + lane.other_ms) / plain  # what a round costs besides its verify, in plain steps
    budget = lane.tau - fixed
    if budget > 1.0:
        lines.append(f"With this head (tau {lane.tau:.2f}), speculation pays wherever a verify costs under "
                     f"{budget:.2f} plain steps: at about one plain step (memory-bound decoding, as on a GPU) "
                     f"it would run {lane.tau / (1 + fixed):.2f}x plain.")
    else:
        lines.append(f"Even a verify as cheap as one plain step would not pay with this head: draft and bookkeeping "
                     f"cost {fixed:.2f} plain steps, so a round must commit more than {1 + fixed:.2f} tokens "
                     f"(it committed {lane.tau:.2f}).")
    return lines


def why_markdown(traces: list[RunTrace], choice=None, verify_curve: dict[int, float] | None = None,
                 vocab_size: int | None = None, machine: str = "") -> str:
    head = f"### Why this speed{f' ({machine})' if machine else ''}\n\n"
    return head + "\n".join(f"- {line}" for line in why_lines(traces, choice, verify_curve, vocab_size))

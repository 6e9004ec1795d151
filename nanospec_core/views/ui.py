"""What the Gradio app shows, built from plain data: validated settings, Plotly charts, token colouring, tables.

Nothing here imports gradio, so it is tested (and reusable) without a server. The charts fix their axes in advance
(`ChartAxes`), so a live update moves the bars, not the frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ..compare import RunTrace, first_difference
from ..config import LIMITS, GenerationConfig, TreeConfig, VocabConfig
from ..errors import NanoSpecError

MAX_PROMPT_CHARS = 4000
MAX_MODEL_NAME_CHARS = 300

DEFAULTS = {"max_new_tokens": 128, "temperature": 0.0, "seed": 0, **vars(TreeConfig()),
            **{k: v for k, v in vars(VocabConfig()).items() if k in LIMITS}}


EXAMPLES = [  # (label, prompt): one per task kind
    ("code", "Write a Python function `is_palindrome(s)` that ignores case and punctuation, with a short docstring "
             "and three doctest examples."),
    ("code edit", "Rename the variable `lst` to `numbers` everywhere in this code and add type hints:\n\n"
                  "def mean(lst):\n    total = 0\n    for x in lst:\n        total += x\n"
                  "    return total / len(lst)\n"),
    ("chat", "I have a job interview tomorrow and I'm nervous. Give me five practical tips to prepare tonight."),
    ("math", "A train travels 180 km in 2 hours and then 120 km in 1.5 hours. What is its average speed over the "
             "whole trip? Explain step by step."),
    ("summarisation", "Summarize in two sentences: Speculative decoding speeds up language model inference by letting "
                      "a small draft model propose several tokens that the large target model then verifies in a "
                      "single forward pass. Because verification accepts exactly the tokens the target would have "
                      "produced, the output is unchanged, while the number of expensive target passes drops."),
    ("translation", "Translate into French: The meeting has been moved to Thursday at ten o'clock. Please bring the "
                    "quarterly report and let me know if you cannot attend."),
]


def _number(name: str, value) -> float | int:
    low, high, integer = LIMITS[name]
    label = name.replace("_", " ")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise NanoSpecError(f"{label} must be a number, got {value!r}") from None
    if math.isnan(number) or not low <= number <= high:
        raise NanoSpecError(f"{label} must be between {low} and {high}, got {value}")
    if integer:
        if number != int(number):
            raise NanoSpecError(f"{label} must be a whole number, got {value}")
        return int(number)
    return number


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise NanoSpecError("the prompt is empty: type a question or pick an example")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise NanoSpecError(f"the prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    return prompt


def check_precision(label, fastest: str) -> str:
    """A PRECISIONS label (or a dtype it names: 'auto', 'float32') -> the dtype to load; 'auto' is `fastest`."""
    if label in PRECISIONS.values():
        return label
    if label not in PRECISIONS:
        raise NanoSpecError(f"precision must be one of {', '.join(PRECISIONS)}, got {label!r}")
    return fastest if PRECISIONS[label] == "auto" else PRECISIONS[label]


def check_model_name(name) -> str:
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        raise NanoSpecError("the model name is empty: use 'embedded', a hub id or a local folder")
    if len(name) > MAX_MODEL_NAME_CHARS or any(c in name for c in "\n\r\t\0"):
        raise NanoSpecError("the model name is not valid: use 'embedded', a hub id or a local folder")
    return name


def parse_settings(**values) -> tuple[GenerationConfig, TreeConfig, VocabConfig]:
    """Checked configs from the app's controls (missing ones take DEFAULTS); NanoSpecError names the bad one."""
    unknown = set(values) - set(LIMITS)
    if unknown:
        raise NanoSpecError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    v = {name: _number(name, values.get(name, DEFAULTS[name])) for name in LIMITS}
    if v["static_core"] >= v["capacity"]:
        raise NanoSpecError(f"static core ({v['static_core']}) must be smaller than capacity ({v['capacity']})")
    gen = GenerationConfig(max_new_tokens=v["max_new_tokens"], temperature=v["temperature"], seed=v["seed"])
    tree = TreeConfig(depth=v["depth"], top_k=v["top_k"], total_tokens=v["total_tokens"])
    vocab = VocabConfig(capacity=v["capacity"], prompt_topk=v["prompt_topk"], node_topk=v["node_topk"],
                        static_core=v["static_core"], fallback_threshold=v["fallback_threshold"])
    return gen, tree, vocab


# ---------------------------------------------------------------------------------------------------------
# Charts. Axes are fixed when a run starts and only ever grow, in big steps, if a run outgrows them.

COLORS = {"eagle": "#7f7f7f", "backbone": "#4c78a8", "lm_head": "#f58518", "gather": "#54a24b", "tree": "#b279a2",
          "vocab": "#4c78a8", "hit": "#54a24b", "cumulative": "#e45756", "distinct": "#f58518"}


def _nice_ceiling(value: float) -> float:
    """The next of 1, 2, 5 x 10^n at or above value (> 0)."""
    exponent = math.floor(math.log10(max(value, 1e-9)))
    for step in (1, 2, 5, 10):
        if step * 10**exponent >= value:
            return step * 10**exponent
    return 10 ** (exponent + 1)


@dataclass
class ChartAxes:
    """Axis ranges for one run: rounds from max_new_tokens (assumes tau >= 2), latency from the first rounds."""

    max_new_tokens: int
    capacity: int
    rounds: int = 0
    latency_ms: float = 0.0

    def __post_init__(self):
        self.rounds = self.rounds or max(8, math.ceil(self.max_new_tokens / 2))

    def fit(self, left: RunTrace, right: RunTrace) -> None:
        """Grow (never shrink) the ranges: rounds to the worst case (tau = 1), latency in doubling steps.

        The latency scale follows the typical round (median), not the peak, so one slow round (a first-call cost,
        another process) is cut off at the top instead of flattening every other bar.
        """
        rounds = max(len(left.rounds), len(right.rounds))
        if rounds > self.rounds:
            self.rounds = max(self.max_new_tokens, rounds)
        draft_ms = sorted(s.draft_ms for t in (left, right) for s in t.rounds)
        if not draft_ms:
            return
        typical = draft_ms[len(draft_ms) // 2]
        if self.latency_ms == 0.0:
            self.latency_ms = _nice_ceiling(typical * 3)
        while typical > 0.6 * self.latency_ms:
            self.latency_ms *= 2


def chart_layout(fig, title: str, x_max: float, x_title: str, y_range, y_title: str, height: int = 360):
    fig.update_layout(title=dict(text=title, font=dict(size=14)), template="plotly_white", height=height,
                      margin=dict(l=55, r=55, t=40, b=95), uirevision="fixed", barmode="stack",
                      legend=dict(orientation="h", yanchor="top", y=-0.22, x=0, font=dict(size=11)))
    fig.update_layout(xaxis=dict(range=[0.5 if x_title == "round" else 0, x_max + 0.5], title=x_title),
                      yaxis=dict(range=y_range, title=y_title))
    return fig


def vocab_hit_figure(right: RunTrace, axes: ChartAxes, full_vocab: int | None = None):
    """NanoSpec per round: active-vocabulary size (bars, left axis), hit rate and cumulative coverage (right)."""
    import plotly.graph_objects as go

    rounds = right.rounds
    x = [s.round for s in rounds]
    fig = go.Figure()
    sizes = [min(s.active_vocab or 0, axes.capacity) for s in rounds]
    fig.add_bar(x=x, y=sizes, name="active vocab", marker_color=COLORS["vocab"], opacity=0.55,
                hovertemplate="round %{x}: %{y} rows scored<extra></extra>")
    fallback = [s.round for s in rounds if s.fallback]
    if fallback:
        fig.add_scatter(x=fallback, y=[axes.capacity] * len(fallback), mode="markers", name="full-vocab fallback",
                        marker=dict(symbol="x", color="#e45756", size=9))
    hits = [(s.round, s.hits) for s in rounds if s.hits]
    seen = hit_count = 0
    cumulative = []
    for _, round_hits in hits:
        seen, hit_count = seen + len(round_hits), hit_count + sum(round_hits)
        cumulative.append(hit_count / seen)
    fig.add_scatter(x=[r for r, _ in hits], y=[sum(h) / len(h) for _, h in hits], yaxis="y2", mode="markers",
                    name="hit rate (round)", marker=dict(color=COLORS["hit"], size=6))
    fig.add_scatter(x=[r for r, _ in hits], y=cumulative, yaxis="y2", mode="lines", name="coverage (cumulative)",
                    line=dict(color=COLORS["cumulative"], width=2))
    title = "NanoSpec: active vocabulary and hit rate per round"
    if full_vocab:
        title += f" (plain EAGLE scores all {full_vocab:,} rows)"
    chart_layout(fig, title, axes.rounds, "round", [0, axes.capacity * 1.05], "rows scored by the draft lm head")
    fig.update_layout(yaxis2=dict(range=[0, 1.05], overlaying="y", side="right", title="hit rate",
                                  tickformat=".0%", showgrid=False))
    return fig


def latency_figure(left: RunTrace, right: RunTrace, axes: ChartAxes):
    """Draft ms per round: NanoSpec stacked by stage (bars), plain EAGLE's total and lm-head share (lines)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    rounds = right.rounds
    x = [s.round for s in rounds]
    for part, label in (("backbone", "backbone"), ("lm_head", "lm head"), ("gather", "gather"), ("tree", "tree")):
        fig.add_bar(x=x, y=[getattr(s, f"{part}_ms") for s in rounds], name=f"NanoSpec {label}",
                    marker_color=COLORS[part], hovertemplate=f"round %{{x}} {label}: %{{y:.2f}} ms<extra></extra>")
    eagle = left.rounds
    fig.add_scatter(x=[s.round for s in eagle], y=[s.draft_ms for s in eagle], mode="lines+markers",
                    name="EAGLE draft", line=dict(color=COLORS["eagle"], width=2), marker=dict(size=4))
    fig.add_scatter(x=[s.round for s in eagle], y=[s.lm_head_ms for s in eagle], mode="lines",
                    name="EAGLE lm head", line=dict(color=COLORS["lm_head"], width=1.5, dash="dot"))
    return chart_layout(fig, "Draft latency per round", axes.rounds, "round", [0, axes.latency_ms or 1.0], "ms")


# ---------------------------------------------------------------------------------------------------------
# Summary table, the equality check, the status line. Lanes are RunTraces in the app's order: the reference first
# (plain decoding, the target alone), then the speculative methods.

LANE_LABELS = {"vanilla": "Plain decoding", "hf": "transformers generate", "eagle": "EAGLE",
               "static": "EAGLE + FR-Spec (static vocab)", "nanospec": "EAGLE + NanoSpec",
               "hf-lookup": "transformers prompt lookup", "lookup": "copy lookup (no head)",
               "eagle+copy": "EAGLE + copies", "nanospec+copy": "EAGLE + NanoSpec + copies"}


def lane_label(method: str) -> str:
    return LANE_LABELS.get(method, method)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summary_frame(traces: list[RunTrace] | tuple[RunTrace, ...]) -> pd.DataFrame:
    """One row per lane: tokens/s, speedup vs the first lane (plain decoding) and vs EAGLE, tau, draft/verify ms
    per round and the whole round (the lane's own time, prefill left out), active vocabulary, coverage."""
    tps = {t.method: (t.summary().tokens_per_s if t.wall_s > 0 else None) for t in traces}
    eagle_lane = next((t.method for t in traces if t.method.startswith("eagle")), None)  # with or without copies
    reference, eagle = tps[traces[0].method], tps.get(eagle_lane)
    rows = []
    for trace in traces:
        s = trace.summary()
        rows.append({
            "method": lane_label(trace.method),
            "tokens/s": round(tps[trace.method], 2) if tps[trace.method] else None,
            f"vs {lane_label(traces[0].method).lower()}": _ratio(tps[trace.method], reference),
            "vs EAGLE": None if trace.method in (eagle_lane, traces[0].method) else _ratio(tps[trace.method], eagle),
            "tau": round(s.mean_accepted, 3) if s.mean_accepted is not None else None,
            "draft ms/round": round(1e3 * s.draft_s / s.rounds, 2) if s.rounds and s.draft_s else None,
            "verify ms/round": round(1e3 * s.verify_s / s.rounds, 2) if s.rounds else None,
            "ms/round": round(s.round_ms, 2) if s.rounds else None,  # all of it
            "avg active vocab": round(s.avg_active_vocab) if s.avg_active_vocab is not None else None,
            "coverage": round(s.coverage, 4) if s.coverage is not None else None,
            "new tokens": s.new_tokens,
            "rounds": s.rounds,
        })
    return pd.DataFrame(rows)


COPIES = True  # the app's EAGLE lanes draft copy branches by default (docs/results.md: they pay on Spec-Bench here)
PRECISIONS = {"fastest measured": "auto", "float32: exact greedy equality": "float32"}  # app label -> dtype


def identity_check(traces, temperature: float, decode, dtype: str = "float32",
                   margins: dict[str, float] | None = None) -> str:
    """Markdown: is every lane's output the first lane's (plain decoding's) token for token (at temperature 0)?

    A greedy difference is explained by the precision: in float32 it must not happen (a bug to report); in bf16
    a batched tree forward and a one-token forward can round differently, and margins[method] (the target's top-2
    logit gap at that lane's first difference, compare.top2_margin) shows how close the tie was."""
    if temperature > 0:
        return ("**Outputs identical:** not expected at temperature > 0: every run is an exact sample of the "
                "target's distribution, but they consume random numbers differently.")
    reference, others = traces[0], traces[1:]
    done = all(t.finished for t in traces)
    n = min(len(t.token_ids) for t in traces)
    scope = "" if done else f" so far ({n} tokens)"
    ids = lambda t: t.token_ids if done else t.token_ids[:n]  # noqa: E731
    differences = [(t, first_difference(ids(reference), ids(t))) for t in others]
    differences = [(t, position) for t, position in differences if position is not None]
    if not differences:
        return f"**Outputs identical{scope}: yes**, all {len(traces)} lanes" + (f" ({n} tokens)" if done else "")
    short = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    lines = []
    for trace, position in differences:
        a, b = ids(reference), ids(trace)
        ours = decode(a[position: position + 1]) if position < len(a) else "(end)"
        theirs = decode(b[position: position + 1]) if position < len(b) else "(end)"
        line = (f"{lane_label(trace.method)} differs from {lane_label(reference.method).lower()} at token "
                f"{position}: {theirs!r} vs {ours!r}")
        margin = (margins or {}).get(trace.method)
        if dtype == "float32":
            line += " -- in float32 greedy outputs must match: this is a bug, please report it with the prompt"
        elif margin is not None:
            line += (f"; the target's top-2 logit margin there is {margin:.4g}: a near-tie at {short} resolution, "
                     "both continuations are the target's greedy choice within rounding")
        else:
            line += f"; in {short} a near-tie can round either way"
        lines.append(line)
    tail = "" if dtype == "float32" else " Choose float32 precision for exact greedy equality."
    return f"**Outputs identical{scope}: no**: " + "; ".join(lines) + "." + tail


def forecast(prediction) -> str:
    """Before (and during) a run: what the tree chooser's cost model expects of speculation on this machine."""
    if prediction is None or prediction.pays is None:
        return ""
    if prediction.pays:
        return (f"predicted: {prediction.expected_tokens_per_s:.1f} tok/s with speculation vs "
                f"{prediction.plain_tokens_per_s:.1f} plain")
    return (f"predicted: no speedup here ({prediction.expected_tokens_per_s:.1f} vs {prediction.plain_tokens_per_s:.1f} "
            f"tok/s plain: a round must commit {prediction.break_even_tau:.2f} tokens, the head is expected to "
            f"commit {prediction.expected_tau:.2f}); the comparison runs anyway")


def status_line(traces, stopped: bool = False, runtime: str = "", forecast: str = "") -> str:
    """'done: Plain decoding n tokens in s · EAGLE ...', then the cost model's forecast, then where and how it runs
    (RuntimeChoice.describe)."""
    state = "stopped" if stopped else ("done" if all(t.finished for t in traces) else "running")
    lanes = ", ".join(f"{lane_label(t.method)} {len(t.token_ids)} tokens in {t.wall_s:.2f} s" for t in traces)
    return f"{state}: {lanes}" + (f" · {forecast}" if forecast else "") + (f" · {runtime}" if runtime else "")


def profile_line(traces, views_s: float, handler_s: float, sends_s: float = 0.0) -> str:
    """One JSON line: the handler's wall time split into the lanes' own rounds (decode), building the updates
    (views), waiting for the server to send them before the next round (sends) and the rest (generator hand-offs,
    the decode thread's queue)."""
    import json

    decode = sum(trace.wall_s for trace in traces)
    return json.dumps({"handler_s": round(handler_s, 4), "decode_s": round(decode, 4), "views_s": round(views_s, 4),
                       "sends_s": round(sends_s, 4), "other_s": round(handler_s - decode - views_s - sends_s, 4),
                       "lanes_s": {trace.method: round(trace.wall_s, 4) for trace in traces}})

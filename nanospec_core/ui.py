"""What the Gradio app shows, built from plain data: validated settings, Plotly charts, token colouring, tables.

Nothing here imports gradio, so it is tested (and reusable) without a server. The charts fix their axes in advance
(`ChartAxes`), so a live update moves the bars, not the frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from .compare import RunTrace, first_difference
from .config import LIMITS, GenerationConfig, TreeConfig, VocabConfig
from .errors import NanoSpecError

MAX_PROMPT_CHARS = 4000
MAX_MODEL_NAME_CHARS = 300

DEFAULTS = {"max_new_tokens": 128, "temperature": 0.0, "seed": 0, **vars(TreeConfig()),
            **{k: v for k, v in vars(VocabConfig()).items() if k in LIMITS}}


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


def _layout(fig, title: str, x_max: float, x_title: str, y_range, y_title: str, height: int = 360):
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
    _layout(fig, title, axes.rounds, "round", [0, axes.capacity * 1.05], "rows scored by the draft lm head")
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
    return _layout(fig, "Draft latency per round", axes.rounds, "round", [0, axes.latency_ms or 1.0], "ms")


def growth_figure(right: RunTrace, max_new_tokens: int, capacity: int):
    """NanoSpec: active-set size against tokens generated, next to the distinct ids the output has used."""
    import plotly.graph_objects as go

    produced, sizes, distinct_counts, seen = [], [], [], set()
    total = 0
    for step in right.steps:
        total += len(step.tokens)
        seen.update(step.tokens)
        if step.round > 0 and step.active_vocab is not None and not step.fallback:
            produced.append(total)
            sizes.append(step.active_vocab)
            distinct_counts.append(len(seen))
    fig = go.Figure()
    fig.add_scatter(x=produced, y=sizes, mode="lines", name="active set", line=dict(color=COLORS["vocab"], width=2))
    fig.add_scatter(x=produced, y=distinct_counts, mode="lines", name="distinct ids in the output",
                    line=dict(color=COLORS["distinct"], width=2, dash="dash"))
    top = max([capacity] + sizes) * 1.05
    return _layout(fig, "Growth of the active set", max_new_tokens, "tokens generated", [0, top], "token ids",
                   height=280)


# ---------------------------------------------------------------------------------------------------------
# Temporal-locality view: each committed token coloured by where its id entered the active set.

ORIGIN_LABELS = {"prompt": "prompt", "prompt-topk": "prompt top-k", "output": "earlier output",
                 "node-topk": "tree top-k", "draft": "earlier draft", "static-core": "static core",
                 "special": "special", "": "miss"}
LOCALITY_COLORS = {"prompt": "#4c78a8", "prompt top-k": "#9ecae9", "earlier output": "#54a24b",
                   "tree top-k": "#72b7b2", "earlier draft": "#eeca3b", "static core": "#bab0ac",
                   "special": "#b279a2", "miss": "#e45756", "hit": "#54a24b"}
LOCALITY_NOTE = """
**Why a tiny vocabulary suffices: temporal locality.** Text reuses its own words. A function name, a variable, a
person's name or the phrase being translated appears in the prompt and comes back again and again in the answer;
the tokens a model emits next are mostly tokens it has just seen, or close relatives the target itself ranked highly.
NanoSpec's draft head therefore scores only the ids of *this* context (the prompt, the target's top-k at each prompt
position and at each verified tree node, and what it already wrote), a few hundred to a few thousand rows instead of
the whole vocabulary (150k for Qwen). Verification by the target is unchanged, so the output stays exactly the
target's; a token outside the set (red, a *miss*) only means the draft could not propose it and the target supplies
it as the bonus token. The set grows fast at first, then slowly: each new sentence mostly reuses ids already in it.
"""


def token_pieces(decode, ids: list[int], start: int = 0, window: int = 6) -> list[str]:
    """The text each id adds (ids[start:]), from short windowed decodes: linear time, multi-byte characters kept.

    A piece that ends inside a UTF-8 character is left empty; its text shows with the token that completes it.
    """
    pieces = []
    for i in range(start, len(ids)):
        low = max(0, i - window)
        before = decode(ids[low:i]).rstrip("\ufffd")
        text = decode(ids[low: i + 1])
        pieces.append("" if text.endswith("\ufffd") else text[len(before):])
    return pieces


def token_labels(trace: RunTrace) -> list[str | None]:
    """Per committed token: its origin label ('miss' if it was not active), 'hit'/'miss' when the policy does not
    report origins, None for the prefill's first token (no draft proposed it)."""
    labels: list[str | None] = []
    for step in trace.steps:
        hits, origins = step.hits, step.origins
        for i in range(len(step.tokens)):
            if step.round == 0 or hits is None or i >= len(hits):
                labels.append(None)
            elif not hits[i]:
                labels.append("miss")
            elif origins is not None and i < len(origins) and origins[i]:
                labels.append(ORIGIN_LABELS.get(origins[i], origins[i]))
            else:
                labels.append("hit")
    return labels


def locality_spans(pieces: list[str], labels: list[str | None]) -> list[tuple[str, str | None]]:
    """HighlightedText value: (text, category) per token, empty pieces dropped."""
    return [(piece, label) for piece, label in zip(pieces, labels) if piece]


# ---------------------------------------------------------------------------------------------------------
# Summary table and the equality check.

def summary_frame(left: RunTrace, right: RunTrace, labels=("EAGLE", "EAGLE + NanoSpec")) -> pd.DataFrame:
    """One row per method: tokens/s, speedup vs the left method, tau, draft/verify ms per round, vocab, coverage."""
    rows = []
    base_tps = None
    for trace, label in zip((left, right), labels):
        s = trace.summary()
        tps = s.tokens_per_s if s.wall_s > 0 else None
        base_tps = tps if base_tps is None else base_tps
        rows.append({
            "method": label,
            "tokens/s": round(tps, 2) if tps else None,
            "speedup": round(tps / base_tps, 3) if tps and base_tps else None,
            "tau": round(s.mean_accepted, 3) if s.mean_accepted is not None else None,
            "draft ms/round": round(1e3 * s.draft_s / s.rounds, 2) if s.rounds else None,
            "verify ms/round": round(1e3 * s.verify_s / s.rounds, 2) if s.rounds else None,
            "avg active vocab": round(s.avg_active_vocab) if s.avg_active_vocab is not None else None,
            "coverage": round(s.coverage, 4) if s.coverage is not None else None,
            "new tokens": s.new_tokens,
            "rounds": s.rounds,
        })
    return pd.DataFrame(rows)


PRECISIONS = {"fastest measured": "auto", "float32: exact greedy equality": "float32"}  # app label -> dtype


def identity_check(left: RunTrace, right: RunTrace, temperature: float, decode, dtype: str = "float32",
                   margin: float | None = None) -> str:
    """Markdown line: are the two outputs the same token for token (meaningful at temperature 0)?

    A greedy difference is explained by the precision: in float32 it must not happen (a bug to report); in bf16
    a batched tree forward and a one-token forward can round differently, and `margin` (the target's top-2 logit
    gap at the first difference, compare.top2_margin) shows how close the tie was."""
    if temperature > 0:
        return ("**Outputs identical:** not expected at temperature > 0: both runs are exact samples of the target's "
                "distribution, but they consume random numbers differently.")
    done = left.finished and right.finished
    n = min(len(left.token_ids), len(right.token_ids))
    a, b = (left.token_ids, right.token_ids) if done else (left.token_ids[:n], right.token_ids[:n])
    position = first_difference(a, b)
    scope = "" if done else f" so far ({n} tokens)"
    if position is None:
        return f"**Outputs identical{scope}: yes**" + (f" ({len(a)} tokens)" if done else "")
    ours = decode(a[position: position + 1]) if position < len(a) else "(end)"
    theirs = decode(b[position: position + 1]) if position < len(b) else "(end)"
    line = (f"**Outputs identical{scope}: no**, first difference at token {position}: EAGLE {ours!r} vs "
            f"NanoSpec {theirs!r}")
    if dtype == "float32":
        return line + (" -- in float32 greedy outputs must match: this is a bug, please report it with the "
                       "prompt and settings")
    short = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    if margin is not None:
        line += (f"; the target's top-2 logit margin there is {margin:.4g}: a near-tie at {short} resolution: both "
                 "continuations are the target's greedy choice within rounding")
    else:
        line += f"; in {short} a near-tie can round either way"
    return line + ". Choose float32 precision for exact greedy equality."


def status_line(left: RunTrace, right: RunTrace, stopped: bool = False, runtime: str = "") -> str:
    """'done: EAGLE n tokens in s, NanoSpec m tokens in s', then where and how it runs (RuntimeChoice.describe)."""
    state = "stopped" if stopped else ("done" if left.finished and right.finished else "running")
    line = (f"{state}: EAGLE {len(left.token_ids)} tokens in {left.wall_s:.2f} s, "
            f"NanoSpec {len(right.token_ids)} tokens in {right.wall_s:.2f} s")
    return line + (f" · {runtime}" if runtime else "")

"""The temporal-locality view: where each committed token's id entered NanoSpec's active set, how the set grows,
and which origins the committed tokens came from. A token a copy branch proposed (phrase locality: a span copied
from earlier in the context, decoding/copy_draft.py) is labelled 'copied', whatever its id's origin.

Built from a RunTrace's StepStats only (hits and origins per committed token, active-set size per round), so it is
tested without a server; the app draws what these return.
"""
from __future__ import annotations

import math

import pandas as pd

from ..compare import RunTrace
from .ui import COLORS, chart_layout

ORIGIN_LABELS = {"prompt": "prompt", "prompt-topk": "prompt top-k", "output": "earlier output",
                 "node-topk": "tree top-k", "draft": "earlier draft", "static-core": "static core",
                 "special": "special", "": "miss"}
LOCALITY_COLORS = {"prompt": "#4c78a8", "prompt top-k": "#9ecae9", "earlier output": "#54a24b",
                   "tree top-k": "#72b7b2", "earlier draft": "#eeca3b", "static core": "#bab0ac",
                   "special": "#b279a2", "miss": "#e45756", "hit": "#54a24b", "copied": "#f58518"}
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
    """Per committed token: 'copied' if a copy branch proposed it, else its origin label ('miss' if it was not
    active), 'hit'/'miss' when the policy does not report origins, None for the prefill's first token (no draft
    proposed it) and for a method without a vocabulary policy (lookup) where no copy proposed it."""
    labels: list[str | None] = []
    for step in trace.steps:
        hits, origins, copied = step.hits, step.origins, step.copied
        for i in range(len(step.tokens)):
            if step.round > 0 and copied is not None and i < len(copied) and copied[i]:
                labels.append("copied")
            elif step.round == 0 or hits is None or i >= len(hits):
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


def growth_figure(trace: RunTrace, max_new_tokens: int, full_vocab: int | None = None):
    """Active-set size and the distinct ids the output has used, against tokens generated, on a log axis.

    The two differ by 30-100x (a few thousand rows against a few dozen ids), so on a linear axis the line that
    makes the point, the output's own vocabulary, lies flat at zero; on a log axis both read, and the full
    vocabulary (what plain EAGLE scores every round) is the dotted ceiling above them.
    """
    import plotly.graph_objects as go

    produced, sizes, distinct_counts, seen = [], [], [], set()
    total = 0
    for step in trace.steps:
        total += len(step.tokens)
        seen.update(step.tokens)
        if step.round > 0 and step.active_vocab is not None and not step.fallback:
            produced.append(total)
            sizes.append(step.active_vocab)
            distinct_counts.append(len(seen))
    fig = go.Figure()
    fig.add_scatter(x=produced, y=sizes, mode="lines", name="active set (rows the draft scores)",
                    line=dict(color=COLORS["vocab"], width=2))
    fig.add_scatter(x=produced, y=distinct_counts, mode="lines", name="distinct ids in the output",
                    line=dict(color=COLORS["distinct"], width=2, dash="dash"))
    top = max([full_vocab or 0, *sizes, 10])
    if full_vocab:
        fig.add_scatter(x=[0, max_new_tokens], y=[full_vocab, full_vocab], mode="lines", hoverinfo="name",
                        name=f"full vocabulary ({full_vocab:,}, plain EAGLE)", line=dict(color="#7f7f7f", dash="dot"))
    chart_layout(fig, "Growth of the active set (log scale)", max_new_tokens, "tokens generated", None, "token ids",
                 height=300)
    fig.update_layout(yaxis=dict(type="log", range=[0, math.log10(top) + 0.15], title="token ids (log)"))
    return fig


def origin_shares(trace: RunTrace) -> pd.DataFrame:
    """Committed tokens by where their id entered the active set, and those copy branches proposed ('copied'): one
    row per origin, misses last. The prefill's first token is left out (no draft could propose it). Shares add up
    to 1."""
    labels = [label for label in token_labels(trace) if label is not None]
    order = [label for label in LOCALITY_COLORS if label != "miss"] + ["miss"]
    counts = {label: labels.count(label) for label in order if labels.count(label)}
    rows = [{"origin": label, "tokens": n, "share": round(n / len(labels), 3)} for label, n in counts.items()]
    return pd.DataFrame(rows, columns=["origin", "tokens", "share"])

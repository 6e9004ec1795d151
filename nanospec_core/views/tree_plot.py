"""One round's EAGLE-2 draft tree as a Plotly figure: what the head drafted, and which branch the target took.

Nodes sit by depth (x) in a tidy layout (y: leaves in depth-first order, each parent centred over its children),
so a subtree never crosses another. The root is the last committed token; the accepted path is drawn bold, the
rejected branches faded, and the target's bonus token (its own choice after the last accepted node, the one the
draft did not propose) is a star, red when its id was outside NanoSpec's active set (a miss: no draft from that
set could have proposed it). Hovering a node shows its token, its draft probability given its parent and the
cumulative probability of the path (the score EAGLE-2 ranks by). Nodes a copy branch proposed (copied from earlier
in the context) are diamonds ringed in orange, and their hover names the context position they were copied from.
Legible up to EAGLE's GPU preset (60 nodes).
"""
from __future__ import annotations

import math
from collections.abc import Callable

from ..metrics import TreeView

COLORS = {"accepted": "#2ca02c", "rejected": "#b0b0b0", "bonus": "#ff7f0e", "miss": "#e45756", "root": "#1f77b4",
          "copy": "#f58518"}


def layout(parents: list[int]) -> tuple[list[int], list[float]]:
    """(depth, y) per node for a forest under one root (parents -1); the root itself is depth 0, y = mean."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parents):
        children.setdefault(parent, []).append(node)
    depth, y, next_leaf = [0] * len(parents), [0.0] * len(parents), [0.0]

    def place(node: int, d: int) -> float:
        kids = children.get(node, [])
        if node >= 0:
            depth[node] = d
        if not kids:
            y_node, next_leaf[0] = next_leaf[0], next_leaf[0] + 1
        else:
            y_node = sum(place(kid, d + 1) for kid in kids) / len(kids)
        if node >= 0:
            y[node] = y_node
        return y_node

    root_y = place(-1, 0)
    return depth, [v - root_y for v in y]


def tree_figure(tree: TreeView, decode: Callable[[int], str], title: str = "", bonus_missed: bool = False):
    """The figure for one round (see the module docstring); decode(token id) -> its text; bonus_missed: the bonus
    token was outside the active set."""
    import plotly.graph_objects as go

    n = len(tree.tokens)
    depth, y = layout(tree.parents)
    on_path = set(tree.path)
    x_of = lambda node: 0 if node < 0 else depth[node]  # noqa: E731
    y_of = lambda node: 0.0 if node < 0 else y[node]  # noqa: E731
    fig = go.Figure()
    for accepted in (False, True):  # edges: faded rejected ones first, the accepted path on top
        xs, ys = [], []
        for node, parent in enumerate(tree.parents):
            if (node in on_path) == accepted:
                xs += [x_of(parent), x_of(node), None]
                ys += [y_of(parent), y_of(node), None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(color=COLORS["accepted" if accepted else "rejected"],
                                           width=3 if accepted else 1)))

    origins = tree.origins or ["head"] * n
    copied = [origin != "head" for origin in origins]

    def hover(node: int) -> str:
        parent_score = tree.scores[tree.parents[node]] if tree.parents[node] >= 0 else 0.0
        text = (f"{decode(tree.tokens[node])!r}<br>draft p = {math.exp(tree.scores[node] - parent_score):.3f}"
                f"<br>path p = {math.exp(tree.scores[node]):.3f}<br>depth {depth[node]}")
        if copied[node]:  # a copy node's score is its estimated acceptance, not a head probability
            also = ", the head drafted it too" if origins[node] == "both" else ""
            text += f"<br>copied from context position {tree.sources[node]}{also}"
        return text

    for name, nodes in (("rejected", [i for i in range(n) if i not in on_path]), ("accepted", tree.path)):
        fig.add_trace(go.Scatter(
            x=[depth[i] for i in nodes], y=[y[i] for i in nodes], mode="markers+text", name=name,
            text=[decode(tree.tokens[i]) for i in nodes], textposition="middle right", textfont=dict(size=11),
            hovertext=[hover(i) for i in nodes], hoverinfo="text",
            marker=dict(size=11 if name == "accepted" else 8, color=COLORS[name],
                        symbol=["diamond" if copied[i] else "circle" for i in nodes],
                        line=dict(width=[2 if copied[i] else 0 for i in nodes], color=COLORS["copy"]))))
    if any(copied):
        sources = [tree.sources[i] for i in range(n) if copied[i]]
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", hoverinfo="skip",
                                 name=f"copied from the context (positions {min(sources)}-{max(sources)})",
                                 marker=dict(size=10, symbol="diamond", color="white",
                                             line=dict(width=2, color=COLORS["copy"]))))
    last = tree.path[-1] if tree.path else -1
    fig.add_trace(go.Scatter(x=[0], y=[0.0], mode="markers", name="root (last committed)", hoverinfo="name",
                             marker=dict(size=12, color=COLORS["root"], symbol="square")))
    bonus_text = decode(tree.bonus)
    note = ("outside the active set: the draft could not have proposed it" if bonus_missed
            else "the target's own token after the accepted path")
    color = COLORS["miss" if bonus_missed else "bonus"]
    fig.add_trace(go.Scatter(
        x=[x_of(last), x_of(last) + 1], y=[y_of(last), y_of(last)], mode="lines+markers+text",
        name="bonus: a miss (not in the active set)" if bonus_missed else "bonus (target)",
        text=["", bonus_text], textposition="middle right", hoverinfo="text", hovertext=["", f"{bonus_text!r}: {note}"],
        line=dict(color=color, dash="dot"), marker=dict(size=[0, 16], color=color, symbol="star")))
    title = title or f"{n} drafted, {len(tree.path)} accepted + 1 bonus"
    leaves = len(set(range(n)) - set(tree.parents)) if n else 1
    height = min(max(300, 20 * leaves + 110), 1000)  # 20 px a leaf row: the GPU preset's 60 nodes stay legible
    fig.update_layout(title=dict(text=title, font=dict(size=13)), height=height,
                      margin=dict(l=10, r=10, t=40, b=30), legend=dict(orientation="h", y=-0.12),
                      xaxis=dict(title="depth", dtick=1, zeroline=False), yaxis=dict(visible=False))
    return fig

"""A benchmark's tables and charts: markdown tables, a progress bar, and Plotly charts of the speedup per category and
where the draft time goes (backbone / lm head / gather / tree) per method. HTML always (plotly.js inlined: the files
open offline); PNG only when a static engine works.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

SPLIT_LABELS = {"backbone": "backbone", "lm_head": "lm head", "gather": "gather wait", "tree": "tree"}
log = logging.getLogger(__name__)


def speedup_figure(summary: pd.DataFrame, baseline: str):
    """Grouped bars: x = category (then 'overall'), one bar per method, y = tokens/s over the baseline's."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in dict.fromkeys(summary.method):
        part = summary[summary.method == method]
        fig.add_bar(name=method, x=list(part.category), y=list(part.speedup),
                    text=[f"{v:.2f}x" for v in part.speedup], textposition="outside", textangle=-90,
                    customdata=list(part["tokens/s"]), hovertemplate="%{x}: %{y:.3f}x (%{customdata:.2f} tok/s)")
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray")
    top = max([1.0, *summary.speedup.dropna()])
    fig.update_yaxes(range=[0, 1.18 * top])  # head room for the rotated labels
    fig.update_layout(barmode="group", title=f"Speedup over {baseline} (tokens/s ratio)", yaxis_title="speedup",
                      uniformtext_minsize=9, uniformtext_mode="show",  # readable labels on narrow bars
                      xaxis_title="category", legend_title="method", template="plotly_white")
    return fig


def draft_split_figure(draft: pd.DataFrame):
    """Stacked bars: per draft method, ms per round spent in each draft stage."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if not draft.empty:
        for part, label in SPLIT_LABELS.items():
            column = f"{part} ms/round"
            fig.add_bar(name=label, x=list(draft.method), y=list(draft[column]),
                        hovertemplate=f"%{{x}} {label}: %{{y:.3f}} ms/round")
    fig.update_layout(barmode="stack", title="Draft time per round", yaxis_title="ms per round",
                      xaxis_title="method", legend_title="stage", template="plotly_white")
    return fig


def png_engine_available() -> bool:
    """kaleido (1.x drives a local Chrome/Chromium) is optional: without it the charts are HTML only."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return True


def write_figures(figures: dict, out: Path) -> list[Path]:
    """name.html for every figure; name.png too when kaleido can render (failures only skip the PNGs)."""
    written = []
    for name, fig in figures.items():
        path = out / f"{name}.html"
        fig.write_html(path, include_plotlyjs=True)
        written.append(path)
    if png_engine_available():
        for name, fig in figures.items():
            path = out / f"{name}.png"
            try:
                fig.write_image(path, width=1200, height=550)
            except Exception as error:  # no browser for kaleido, sandbox refusal, ...: keep the HTML
                log.warning("PNG export skipped (%s)", str(error).splitlines()[0] if str(error) else error)
                break
            written.append(path)
    return written


def markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, which we do not ship)."""
    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def make_progress(progress, total: int):
    """(advance(text), close()) for progress=True (tqdm), False (silent) or a callable(fraction, text)."""
    if callable(progress):
        done = [0]

        def advance(text):
            done[0] += 1
            progress(done[0] / total, text)

        return advance, lambda: None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="bench", unit="run")

        def advance(text):
            bar.set_postfix_str(text, refresh=False)
            bar.update()

        return advance, bar.close
    return (lambda text: None), (lambda: None)

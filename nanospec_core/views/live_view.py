"""The compare handler's streamed view: what a running comparison sends to the page, and how often.

Every refresh costs twice: the server builds it (markdown, the speed table, Plotly figures) and the browser draws it
(layout of three growing texts, the table, five Plotly figures). On a Space the browser is the visitor's own machine;
with `python app.py` on a laptop or a 2-core box it is drawn on the very cores the rounds run on, and torch's threads
wait for the slowest of them: a core taken by the page slows every forward. So the refresh periods depend on where
the page is drawn (Refresh, choose_refresh), measured in docs/results.md ("The app at the engine's speed, third
pass": `app-bench --browser --refresh ...` reads chromium's CPU per run).

    refresh = choose_refresh(request_host, cores, torch_threads, os.environ.get("NANOSPEC_REFRESH"))
    view = View(session, gen, capacity, prompt_ids, key, tree, methods, refresh)
    for snap in runs:
        if view.due(snap.done):
            yield view.render(snap, snap.done)   # {output name: value}; names left out are not refreshed
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import gradio as gr
import torch

from ..compare import first_difference, lanes, top2_margin
from ..config import GenerationConfig
from ..decode_thread import call as on_decode
from ..errors import NanoSpecError
from . import app_costs, locality_view, ui
from .round_view import drafted_rounds, round_view
from .why import why_markdown

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Refresh:
    """Refresh periods while a comparison runs (the last round always refreshes everything)."""
    texts_s: float = 0.25  # the three texts, status, identity check and speed table: a few updates a second
    charts_s: float = 1.5  # charts, locality view, round view: Plotly redraws are the browser's heaviest work
    note: str = ""  # said in the status line while running, when the periods are not the live ones


LIVE = Refresh()
# The page drawn on the cores that decode: texts once a second, charts every 6 s (chromium's CPU measured, the
# benchmark's third pass; the last round still brings everything).
SHARED = Refresh(1.0, 6.0, "page refreshed every 1 s, charts every 6 s: this browser draws on the cores that decode")


def usable_cores() -> int:
    """Cores this process may run on (its affinity where the OS tells, as in a container; else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_refresh(host: str | None, cores: int, threads: int, setting: str | None = None) -> Refresh:
    """setting ('TEXTS_S,CHARTS_S', NANOSPEC_REFRESH) wins; else SHARED for a viewer on this machine (a loopback
    client) when torch's threads take every core, LIVE otherwise (a Space's visitors, a server with cores to spare)."""
    if setting:
        try:
            texts_s, charts_s = (float(part) for part in setting.split(","))
        except ValueError:
            raise NanoSpecError(f"NANOSPEC_REFRESH must be 'TEXTS_S,CHARTS_S' (seconds), got {setting!r}") from None
        return Refresh(texts_s, charts_s, f"refresh {texts_s:g} s, charts {charts_s:g} s (NANOSPEC_REFRESH)")
    return SHARED if host in LOOPBACK and threads >= cores else LIVE


class View:
    """Turns Snapshots into the compare outputs; keeps the axes and the decoded locality pieces between rounds.
    Texts, status and table refresh every refresh.texts_s; the charts, the locality view and the round view every
    refresh.charts_s, and always with the last round. While running, the round view follows the newest round; once
    done it shows the round with the longest accepted path."""

    def __init__(self, session, gen: GenerationConfig, capacity: int, prompt_ids=None,
                 key: tuple[str, str] | None = None, tree=None, methods=lanes(ui.COPIES), refresh: Refresh = LIVE):
        self.session, self.gen, self.prompt_ids, self.methods, self.refresh = session, gen, prompt_ids, methods, refresh
        self.raw = session.tree_prediction(tree) if tree is not None else None  # the cost model's view
        self.costs = app_costs.key(session, methods[2])
        self.prediction = app_costs.corrected(self.raw, app_costs.load(self.costs))  # and the app's runs
        self.key = key  # (model, precision) of the session cache: the round view's later redraws find it by it
        self.axes = ui.ChartAxes(gen.max_new_tokens, capacity)
        self.pieces: list[str] = []
        self.last_update = self.last_charts = float("-inf")  # the first round refreshes everything
        self.render_s = self.send_s = 0.0  # building / sending updates

    def due(self, done: bool) -> bool:
        return done or time.perf_counter() - self.last_update >= self.refresh.texts_s

    def margins(self, traces, done: bool) -> dict[str, float]:
        """Per lane, the target's top-2 logit margin at its first greedy difference from plain decoding (done, bf16)."""
        if not done or self.gen.temperature > 0 or self.prompt_ids is None or self.session.dtype == torch.float32:
            return {}
        reference, found = traces[0].token_ids, {}
        for trace in traces[1:]:
            position = first_difference(reference, trace.token_ids)
            if position is not None and position < min(len(reference), len(trace.token_ids)):
                prefix = reference[:position]
                found[trace.method] = on_decode(top2_margin, self.session.target, self.prompt_ids, prefix)[0]
        return found

    def rounds_update(self, snap, done: bool) -> dict:
        """The slider, both trees and the details for the round to show now, and the state the slider reads."""
        eagle, nanospec = snap.traces[1:]
        rounds = drafted_rounds(nanospec)
        if not rounds:
            return {}
        pick = rounds[-1]
        if done:
            pick = max(nanospec.rounds, key=lambda s: (len(s.tree.path) if s.tree else -1, -s.round)).round
        view = round_view(nanospec, eagle, pick, self.session.decode, self.session.target.vocab_size)
        return {"round_slider": gr.Slider(minimum=rounds[0], maximum=max(rounds[-1], rounds[0] + 1), value=pick,
                                          interactive=True),
                "nanospec_tree": view.nanospec_figure, "eagle_tree": view.eagle_figure,
                "round_details": view.details, "rounds": (self.key, snap.traces)}

    def render(self, snap, done: bool) -> dict:
        now = self.last_update = time.perf_counter()
        traces, (eagle, nanospec) = snap.traces, snap.traces[1:]
        dtype = str(self.session.dtype).removeprefix("torch.")
        forecast = " · ".join(part for part in (ui.forecast(self.prediction), "" if done else self.refresh.note)
                              if part)
        values = {
            "plain_text": traces[0].text, "eagle_text": eagle.text, "nanospec_text": nanospec.text,
            "status": ui.status_line(traces, runtime=self.session.runtime.describe(), forecast=forecast),
            "identical": ui.identity_check(traces, self.gen.temperature, self.session.decode, dtype,
                                           self.margins(traces, done)),
            "summary": ui.summary_frame(traces),
        }
        if done:  # the break-even arithmetic, from this run's rounds and the machine's cost curve; then learn
            values["why"] = why_markdown(list(traces), self.prediction, self.session.tree_costs()["verify"]
                                         if self.prediction else None, self.session.target.vocab_size,
                                         self.session.runtime.machine)
            app_costs.record(self.costs, traces[0], nanospec, self.raw)  # the next forecast's scale
        if done or now - self.last_charts >= self.refresh.charts_s:
            self.last_charts = now
            self.axes.fit(eagle, nanospec)
            self.pieces += locality_view.token_pieces(self.session.decode, nanospec.token_ids, start=len(self.pieces))
            vocab_size = self.session.target.vocab_size
            values.update({
                "vocab_plot": ui.vocab_hit_figure(nanospec, self.axes, vocab_size),
                "latency_plot": ui.latency_figure(eagle, nanospec, self.axes),
                "locality": locality_view.locality_spans(self.pieces, locality_view.token_labels(nanospec)),
                "growth_plot": locality_view.growth_figure(nanospec, self.gen.max_new_tokens, vocab_size),
                "origins": locality_view.origin_shares(nanospec),
                **self.rounds_update(snap, done),
            })
        self.render_s += time.perf_counter() - now
        return values

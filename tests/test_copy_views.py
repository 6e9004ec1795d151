"""Copies seen in the app's views: their own colour in the output, a share in the locality table, diamonds with their
source span in the round view's tree, and their cost and gain in 'why this speed'."""
from dataclasses import replace

import pytest

from nanospec_core.compare import RunTrace
from nanospec_core.models.eagle import random_head
from nanospec_core.models.target import TargetModel
from nanospec_core.views import locality_view
from nanospec_core.views.round_view import copy_line, round_view
from nanospec_core.views.tree_plot import tree_figure
from nanospec_core.views.why import why_lines
from tests.conftest import tiny_hf_model
from tests.test_copy_engine import VOCAB, decode, repetitive_prompt, tokens_of


@pytest.fixture(scope="module")
def traces():
    """Plain, and EAGLE + NanoSpec + copies, on a prompt worth copying from (the random head rarely hits; copies do)."""
    target = TargetModel(tiny_hf_model("qwen2", vocab=VOCAB))
    prompt = repetitive_prompt(0)
    steps = decode(target, prompt, random_head(target, "eagle2", seed=3), "nanospec")
    copy_trace = RunTrace("nanospec+copy", steps, tokens_of(steps), wall_s=0.05 * len(steps), finished=True)
    plain_steps = decode(target, prompt, copy=None)  # no head, no copies: one token a round, as plain decoding
    plain = RunTrace("vanilla", plain_steps, tokens_of(plain_steps), wall_s=0.02 * len(plain_steps), finished=True)
    assert sum(s.copy_accepted for s in steps) >= 3
    return plain, copy_trace


def test_copied_tokens_get_their_own_label_and_share(traces):
    _, trace = traces
    labels = locality_view.token_labels(trace)
    expected = [None] + [bool(s.copied[i]) for s in trace.steps[1:] for i in range(len(s.tokens))]
    assert [label == "copied" for label in labels] == [bool(flag) for flag in expected]
    assert "copied" in locality_view.LOCALITY_COLORS
    shares = locality_view.origin_shares(trace).set_index("origin")
    copied = sum(s.copy_accepted for s in trace.steps)
    assert shares.loc["copied", "tokens"] == copied
    assert shares.loc["copied", "share"] == round(copied / (len(labels) - 1), 3)


def test_the_round_view_draws_copy_nodes_with_their_source_span(traces):
    _, trace = traces
    step = next(s for s in trace.steps[1:] if s.copy_accepted)
    figure = tree_figure(step.tree, lambda t: f"t{t}")
    sources = [s for s in step.tree.sources if s is not None]
    legend = [t.name for t in figure.data if t.name and t.name.startswith("copied from the context")]
    assert legend == [f"copied from the context (positions {min(sources)}-{max(sources)})"]
    hovers = [h for t in figure.data if t.hovertext for h in t.hovertext if h]
    assert sum("copied from context position" in h for h in hovers) == sum(o != "head" for o in step.tree.origins)
    view = round_view(trace, None, step.round, lambda ids: " ".join(map(str, ids)))
    assert f"Copy branches added {step.copy_nodes} nodes" in view.details
    assert f"{step.copy_accepted} of the committed tokens came from them" in view.details
    assert "drafted nothing" not in view.details  # a round with the head's tree ...
    assert "The head drafted nothing this round" in copy_line(replace(step, head_free=True))  # ... and one without


def test_why_this_speed_counts_the_copy_branches(traces):
    plain, trace = traces
    lines = why_lines([plain, trace])
    (line,) = [line for line in lines if line.startswith("**EAGLE + NanoSpec + copies**")]
    rounds = trace.rounds
    nodes = sum(s.copy_nodes for s in rounds) / len(rounds)
    assert f"copy branches added {nodes:.1f} verify nodes a round" in line

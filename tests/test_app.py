"""The Gradio app: its compare handler on a tiny model (streaming, final texts, equality check, errors, Stop), the UI
helpers it is built from, and the /compare endpoint of the launched app through gradio_client."""
import json

import gradio as gr
import pandas as pd
import pytest
import torch

import app
from nanospec_core.views import locality_view, session_cache, ui
from nanospec_core.compare import RunTrace, first_difference, lanes
from nanospec_core.config import GenerationConfig, TreeConfig, VocabConfig
from nanospec_core.decoding.tree_choice import TreeChoice
from nanospec_core.machine import RuntimeChoice
from nanospec_core.metrics import StepStats

PROMPT = "write python code please"
SMALL = dict(max_new_tokens=16, depth=3, top_k=4, total_tokens=8)  # a few rounds, well under a second


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The app's session cache serving the tiny model (float32, random head); one thread: the tiny model is faster."""
    saved_cache, saved_threads = app.SESSIONS, torch.get_num_threads()
    app.SESSIONS = app.SessionCache(default_model=tiny_model_dir, dtype="float32", head="random")
    torch.set_num_threads(1)
    yield tiny_model_dir
    app.SESSIONS = saved_cache
    torch.set_num_threads(saved_threads)


@pytest.fixture
def every_round(monkeypatch):
    """Refresh the UI on every round (the app throttles to a few updates per second)."""
    monkeypatch.setattr(app, "REFRESH", "0,0")


def compare(prompt, model, copies=ui.COPIES, **settings):
    """The handler as Gradio calls it: positional values in the order of the controls."""
    values = {**ui.DEFAULTS, **settings}
    return app.compare(prompt, model, *(values[name] for name in app.SETTINGS), next(iter(ui.PRECISIONS)), copies)


def named(update) -> dict:
    return dict(zip(app.OUTPUTS, update))


def skipped(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


def test_three_texts_stream_and_the_last_update_carries_the_final_texts(model, every_round):
    updates = [named(u) for u in compare(PROMPT, model, **SMALL)]
    assert len(updates) >= 3
    for key in ("plain_text", "eagle_text", "nanospec_text"):
        assert any(0 < len(u[key]) < len(updates[-1][key]) for u in updates[:-1])
    session = app.SESSIONS.get(model)
    gen, tree, vocab = ui.parse_settings(**SMALL)
    for method, key in zip(lanes(ui.COPIES), ("plain_text", "eagle_text", "nanospec_text")):
        assert updates[-1][key] == session.generate(method, PROMPT, gen, tree=tree, vocab=vocab).text
    final = updates[-1]
    assert final["status"].startswith("done")
    assert not any(skipped(v) for v in final.values())  # the last round always refreshes everything
    assert len(final["locality"]) > 0


def test_the_refresh_periods_decide_which_rounds_reach_the_page(model, monkeypatch):
    """NANOSPEC_REFRESH (or the viewer's place, live_view.choose_refresh) sets how often a run refreshes: with
    periods longer than the run only the first round and the last are sent; the status says so while running."""
    monkeypatch.setattr(app, "REFRESH", "1000,1000")
    updates = [named(u) for u in compare(PROMPT, model, **SMALL)]
    assert len(updates) == 2, [u["status"] for u in updates]
    assert "(NANOSPEC_REFRESH)" in updates[0]["status"] and "(NANOSPEC_REFRESH)" not in updates[1]["status"]
    assert updates[1]["status"].startswith("done") and not skipped(updates[1]["vocab_plot"])
    monkeypatch.setattr(app, "REFRESH", "0,0")
    assert len(list(compare(PROMPT, model, **SMALL))) > 2
    monkeypatch.setattr(app, "REFRESH", "fast")
    with pytest.raises(gr.Error, match="NANOSPEC_REFRESH must be"):
        list(compare(PROMPT, model, **SMALL))


def test_greedy_outputs_are_identical_and_the_check_says_so(model):
    final = named(list(compare(PROMPT, model, temperature=0.0, **SMALL))[-1])
    assert final["plain_text"] == final["eagle_text"] == final["nanospec_text"]
    assert "Outputs identical: yes**, all 3 lanes" in final["identical"]


def test_every_forward_of_a_comparison_runs_on_the_decode_thread(model, every_round, monkeypatch):
    """Gradio calls next() from whichever worker is free; the lanes' forwards must all land on one thread."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from nanospec_core import decode_thread

    target, threads = app.SESSIONS.get(model).target, []
    forward = target.forward
    monkeypatch.setattr(target, "forward", lambda *a, **k: threads.append(threading.get_ident()) or forward(*a, **k))
    handler = compare(PROMPT, model, **SMALL)
    with ThreadPoolExecutor(max_workers=4) as pool:
        while pool.submit(next, handler, None).result() is not None:
            pass
    assert len(threads) > 3 and set(threads) == {decode_thread.thread_id()}


def test_sampling_check_does_not_claim_identity(model):
    final = named(list(compare(PROMPT, model, temperature=0.8, seed=3, **SMALL))[-1])
    assert final["plain_text"] and final["eagle_text"] and final["nanospec_text"]
    assert "temperature > 0" in final["identical"]


@pytest.mark.parametrize("copies", [False, True])
def test_the_copy_switch_gives_both_eagle_lanes_copy_branches(model, copies):
    final = named(list(compare(PROMPT, model, copies=copies, **SMALL))[-1])
    (_, traces), suffix = final["rounds"], " + copies" if copies else ""
    assert [t.method for t in traces] == ["vanilla", "eagle" + "+copy" * copies, "nanospec" + "+copy" * copies]
    assert list(final["summary"].method) == ["Plain decoding", "EAGLE" + suffix, "EAGLE + NanoSpec" + suffix]
    assert final["plain_text"] == final["eagle_text"] == final["nanospec_text"]  # float32: lossless either way


def test_summary_table_gives_speedups_against_plain_decoding_and_eagle(model):
    table = named(list(compare(PROMPT, model, copies=False, **SMALL))[-1])["summary"]
    assert list(table.method) == ["Plain decoding", "EAGLE", "EAGLE + NanoSpec"]
    for column in ("tokens/s", "tau", "draft ms/round", "vs plain decoding", "vs EAGLE", "avg active vocab",
                   "coverage"):
        assert column in table.columns
    tps, vs_plain, vs_eagle = table["tokens/s"], table["vs plain decoding"], table["vs EAGLE"]
    assert vs_plain[0] == 1.0 and vs_plain[1] == pytest.approx(tps[1] / tps[0], abs=2e-3)
    assert vs_eagle[2] == pytest.approx(tps[2] / tps[1], abs=2e-3) and pd.isna(vs_eagle[0]) and pd.isna(vs_eagle[1])
    assert table["tau"][0] == 1.0 and pd.isna(table["draft ms/round"][0])  # one token per target forward, no draft
    assert table["avg active vocab"][2] < table["avg active vocab"][1] == app.SESSIONS.get(model).target.vocab_size
    assert table["new tokens"][0] == table["new tokens"][1] == table["new tokens"][2] > 0


@pytest.mark.parametrize("prompt, settings, message", [
    ("", {}, "the prompt is empty"),
    ("   \n", {}, "the prompt is empty"),
    ("x" * 4001, {}, "limit is 4000"),
    (PROMPT, {"max_new_tokens": 0}, "max new tokens must be between 1 and 1024"),
    (PROMPT, {"temperature": -1}, "temperature must be between"),
    (PROMPT, {"top_k": "many"}, "top k must be a number"),
    (PROMPT, {"depth": 2.5}, "depth must be a whole number"),
    (PROMPT, {"capacity": 512, "static_core": 512}, "static core .* must be smaller than capacity"),
    (PROMPT, {"model": "/no/such/model-folder"}, "model '/no/such/model-folder' is not served here: choose"),
    (PROMPT, {"model": " "}, "model name is empty"),
])
def test_bad_input_is_one_clear_error(model, prompt, settings, message):
    settings = dict(settings)
    chosen = settings.pop("model", model)
    with pytest.raises(gr.Error, match=message):
        next(compare(prompt, chosen, **settings))


def test_unknown_model_is_a_clear_error_when_any_model_may_load(model, monkeypatch):
    monkeypatch.setattr(app.SESSIONS, "any_model", True)
    with pytest.raises(gr.Error, match="unknown model '/no/such/model-folder'"):
        next(compare(PROMPT, "/no/such/model-folder"))


def test_the_handler_still_works_after_errors(model):
    with pytest.raises(gr.Error):
        next(compare("", model))
    final = named(list(compare(PROMPT, model, **SMALL))[-1])
    assert final["status"].startswith("done")


def test_stop_closes_every_run_and_frees_its_state(model, every_round, monkeypatch):
    session = app.SESSIONS.get(model)
    streams = []
    original = session.stream

    def recording_stream(*args, **kwargs):
        streams.append(original(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(session, "stream", recording_stream)
    handler = compare(PROMPT, model, **{**SMALL, "max_new_tokens": 64})
    next(handler)
    second = next(handler)
    assert not named(second)["status"].startswith("done")
    handler.close()  # what Gradio does on Stop (cancels=...), between two rounds
    assert [s.__name__ for s in streams] == ["plain_decode", "speculative_decode", "speculative_decode"]
    assert all(s.gi_frame is None for s in streams)  # closed: caches and vocabulary buffers released
    monkeypatch.undo()
    assert named(list(compare(PROMPT, model, **SMALL))[-1])["status"].startswith("done")


def test_session_cache_keeps_at_most_two_models_and_notes_random_heads(monkeypatch):
    from nanospec_core import decode_thread

    built, threads = [], set()

    class FakeSession:
        def __init__(self, name, dtype, device, head):
            import threading

            built.append((name, head))
            threads.add(threading.get_ident())
            self.head = object()
            self.runtime = RuntimeChoice(device="cpu", dtype=dtype, source="given")
            self.converted_before = None  # not a packaged model (the cache's start-up line)

        def tree_choice(self):
            return TreeChoice.fixed(TreeConfig(), "fake")

        def tree_costs_cached(self):
            return None

    monkeypatch.setattr(session_cache, "Session", FakeSession)
    cache = app.SessionCache(default_model="a", dtype="float32", head=None, size=2, any_model=True)
    for name in ("a", "b", "a", "c"):
        cache.get(name)
    assert [name for name, _ in built] == ["a", "b", "c"]  # 'a' was reused
    assert list(cache.sessions) == [("a", "float32"), ("c", "float32")]  # 'b', least recently used, was dropped
    cache.get("a", "bfloat16")  # another precision is another session
    assert built[-1][0] == "a" and list(cache.sessions)[-1] == ("a", "bfloat16")
    assert all(head == "random" for _, head in built)  # no head ships for these names
    assert "RANDOM head" in cache.notes["a"]
    assert threads == {decode_thread.thread_id()}  # loaded where they will decode (views/session_cache.py says why)


def test_compare_parameters_follow_the_controls_order():
    import inspect

    names = ["prompt", "model", *app.SETTINGS, "precision", "copies", "request"]  # request: Gradio's, not a control
    assert list(inspect.signature(app.compare).parameters) == names


def test_benchmark_tab_runs_a_small_spec_bench_selection(model, tmp_path, monkeypatch):
    questions = tmp_path / "question.jsonl"
    questions.write_text('{"question_id": 1, "category": "coding", "turns": ["write python code"]}\n'
                         '{"question_id": 2, "category": "translation", "turns": ["translate into french"]}\n')
    monkeypatch.setattr(app, "QUESTIONS", str(questions))
    settings = {**ui.DEFAULTS, **SMALL}
    table, speedup, split = app.benchmark(["coding"], 1, 8, ["eagle", "nanospec"], model,
                                          *(settings[name] for name in app.SETTINGS))
    assert "nanospec" in table and "coding" in table and "translation" not in table
    assert speedup is not None and split is not None
    with pytest.raises(gr.Error, match="unknown category"):
        app.benchmark(["poetry"], 1, 8, ["eagle"], model)
    monkeypatch.setattr(app, "QUESTIONS", str(tmp_path / "missing.jsonl"))
    with pytest.raises(gr.Error, match="questions file .* is missing"):
        app.benchmark([], 1, 8, ["eagle"], model)


# --- UI helpers ----------------------------------------------------------------------------------------------

def test_settings_default_to_the_config_defaults():
    gen, tree, vocab = ui.parse_settings()
    assert gen == GenerationConfig(max_new_tokens=ui.DEFAULTS["max_new_tokens"])
    assert tree == TreeConfig() and vocab == VocabConfig()


def trace(method, rounds, active=100, draft_ms=10.0, hits=None, origins=None) -> RunTrace:
    t = RunTrace(method)
    t.steps = [StepStats(round=0, tokens=[5], accepted=1)]
    t.steps += [StepStats(round=r, tokens=[10 + r, 20 + r], accepted=2, tree_size=8, active_vocab=active + r,
                          hits=hits or [True, False], origins=origins, draft_ms=draft_ms, lm_head_ms=1.0)
                for r in range(1, rounds + 1)]
    t.token_ids = [i for s in t.steps for i in s.tokens]
    t.wall_s = 0.1 * rounds
    return t


def test_chart_axes_are_fixed_up_front_and_only_grow():
    axes = ui.ChartAxes(max_new_tokens=64, capacity=4096)
    assert axes.rounds == 32
    axes.fit(trace("eagle", 3, draft_ms=10.0), trace("nanospec", 3, draft_ms=4.0))
    assert axes.rounds == 32 and axes.latency_ms == 50  # 3x the typical round, rounded up to 1-2-5
    axes.fit(trace("eagle", 3, draft_ms=9.0), trace("nanospec", 3, draft_ms=3.0))
    assert axes.latency_ms == 50  # never shrinks
    axes.fit(trace("eagle", 40, draft_ms=40.0), trace("nanospec", 40, draft_ms=40.0))
    assert axes.rounds == 64 and axes.latency_ms == 100
    figure = ui.latency_figure(trace("eagle", 3), trace("nanospec", 3), axes)
    assert list(figure.layout.xaxis.range) == [0.5, 64.5] and list(figure.layout.yaxis.range) == [0, 100]


def test_locality_labels_use_origins_and_fall_back_to_hit_or_miss():
    with_origins = trace("nanospec", 2, hits=[True, False], origins=["prompt-topk", ""])
    assert locality_view.token_labels(with_origins) == [None, "prompt top-k", "miss", "prompt top-k", "miss"]
    without = trace("nanospec", 1, hits=[True, False], origins=None)
    assert locality_view.token_labels(without) == [None, "hit", "miss"]
    assert locality_view.locality_spans(["a", "", "c"], [None, "hit", "miss"]) == [("a", None), ("c", "miss")]


def test_token_pieces_rebuild_the_decoded_text(model):
    session = app.SESSIONS.get(model)
    result = session.generate("nanospec", PROMPT, GenerationConfig(max_new_tokens=40))
    pieces = locality_view.token_pieces(session.decode, result.token_ids)
    assert len(pieces) == len(result.token_ids) and "".join(pieces) == result.text
    assert locality_view.token_pieces(session.decode, result.token_ids, start=10) == pieces[10:]


def test_identity_check_names_the_first_difference():
    left, right = trace("eagle", 2), trace("nanospec", 2)
    right.token_ids = right.token_ids[:3] + [99] + right.token_ids[4:]
    left.finished = right.finished = True
    line = ui.identity_check([left, right], 0.0, lambda ids: f"<{ids[0]}>")
    assert "no" in line and "token 3" in line and "<99>" in line and "EAGLE + NanoSpec differs from" in line
    assert first_difference(left.token_ids, right.token_ids) == 3


# --- the launched app over HTTP ------------------------------------------------------------------------------

def test_compare_endpoint_streams_the_three_texts_over_http(app_server):
    from gradio_client import Client

    client = Client(app_server.url, verbose=False)
    with pytest.raises(Exception, match="the prompt is empty"):
        client.predict("", api_name="/compare")
    job = client.submit(PROMPT, api_name="/compare")  # every other input takes its default
    final = job.result(timeout=120)
    assert len(job.outputs()) >= 2  # streamed: several updates before the last
    plain_text, eagle_text, nanospec_text, status, identical = final[:5]
    assert plain_text and plain_text == eagle_text == nanospec_text
    assert status.startswith("done") and "Outputs identical: yes" in identical


def test_a_lanes_round_costs_in_the_served_app_what_it_costs_outside(app_server, model):
    """The server adds nothing inside a lane's rounds: per lane, ms per round in the launched app (its summary
    table, read over HTTP) against the same lanes alternated in this process by compare_runs, same tiny model, one
    thread each, best of 3 on both sides. A ratio, not a timed threshold: work the server does beside the rounds
    (views, serialisation, an event loop holding the GIL) shows up as a ratio above 1."""
    from gradio_client import Client

    from nanospec_core.bench.app_bench import frame_rows
    from nanospec_core.compare import compare_runs

    values = {**ui.DEFAULTS, "max_new_tokens": 48}
    client, methods = Client(app_server.url, verbose=False), lanes(ui.COPIES)
    served = {m: [] for m in methods}
    for _ in range(3):
        outputs = client.predict(PROMPT, model, *(values[n] for n in app.SETTINGS), "float32: exact greedy equality",
                                 ui.COPIES, api_name="/compare")
        rows = frame_rows(outputs[app.OUTPUTS.index("summary")])
        for m in methods:
            served[m].append(rows[ui.lane_label(m)]["ms_per_round"])
    session = app.SESSIONS.get(model, "float32")
    gen, tree, vocab = ui.parse_settings(**values)
    outside = {m: [] for m in methods}
    for _ in range(3):
        for snap in compare_runs(session, session.encode(PROMPT), gen, tree, vocab, methods=methods):
            pass
        for trace in snap.traces:
            outside[trace.method].append(trace.summary().round_ms)
    ratios = {m: min(served[m]) / min(outside[m]) for m in methods}
    assert all(r < 1.5 for r in ratios.values()), ratios
    # and the handler held each round until the server had sent the update before it (decode_thread.let_server_send)
    log = app_server.log_path.read_text(errors="replace").splitlines()
    profiles = [json.loads(line.split(" profile ", 1)[1]) for line in log if line.startswith("nanospec app: profile ")]
    assert len(profiles) >= 3 and all(p["sends_s"] > 0 for p in profiles[-3:]), profiles[-3:]


def test_a_bf16_divergence_is_explained_with_the_target_margin():
    left, right = trace("eagle", 2), trace("nanospec", 2)
    right.token_ids = right.token_ids[:3] + [99] + right.token_ids[4:]
    left.finished = right.finished = True
    line = ui.identity_check([left, right], 0.0, lambda ids: f"<{ids[0]}>", dtype="bfloat16",
                             margins={"nanospec": 0.0625})
    assert "token 3" in line and "margin there is 0.0625" in line and "near-tie at bf16 resolution" in line
    assert "float32" in line  # the way to exact equality
    exact = ui.identity_check([left, right], 0.0, lambda ids: f"<{ids[0]}>", dtype="float32")
    assert "bug" in exact and "near-tie" not in exact  # in float32 a difference is never explained away


def test_the_status_line_says_where_and_how_it_runs():
    left, right = trace("eagle", 2), trace("nanospec", 2)
    left.finished = right.finished = True
    choice = RuntimeChoice(device="cpu", dtype="bfloat16", speedup=2.6, runner_up="float32", machine="AMD EPYC")
    line = ui.status_line([left, right], runtime=choice.describe())
    assert line.startswith("done") and "bf16: measured 2.6x faster than float32 on this CPU (AMD EPYC)" in line


def test_float32_precision_is_one_click_away(model):
    final = named(list(app.compare(PROMPT, model, *(ui.DEFAULTS[n] if n not in SMALL else SMALL[n]
                                                      for n in app.SETTINGS), "float32: exact greedy equality"))[-1])
    assert final["plain_text"] == final["eagle_text"] == final["nanospec_text"]
    assert "Outputs identical: yes" in final["identical"]
    with pytest.raises(gr.Error, match="precision must be one of"):
        next(app.compare(PROMPT, model, *(ui.DEFAULTS[n] for n in app.SETTINGS), "fp8 please"))


def test_the_round_view_shows_a_tree_and_the_slider_picks_another_round(model):
    final = named(list(compare(PROMPT, model, **{**SMALL, "max_new_tokens": 24}))[-1])
    slider, rounds = final["round_slider"], final["rounds"]
    (key, traces) = rounds
    nanospec = traces[2]
    assert slider.maximum == len(nanospec.rounds) >= 2 and slider.interactive
    shown = slider.value  # once done: the round with the longest accepted path
    assert len(nanospec.rounds[shown - 1].tree.path) == max(len(s.tree.path) for s in nanospec.rounds)
    assert f"**Round {shown}**" in final["round_details"]
    assert any(t.name == "accepted" for t in final["nanospec_tree"].data)
    other = 1 if shown != 1 else 2
    tree, eagle_tree, details = app.show_round(rounds, other)
    assert f"**Round {other}**" in details and f"round {other}:" in tree.layout.title.text
    assert tree.to_json() != final["nanospec_tree"].to_json()
    assert app.show_round(None, 1)[2] == "Run a comparison first."
    origins = final["origins"]
    assert origins.tokens.sum() == len(nanospec.token_ids) - 1  # every committed token but the prefill's

"""NanoSpec demo: plain decoding, plain EAGLE and EAGLE + NanoSpec side by side, a round view of the draft trees
and the temporal-locality view. `python app.py`: the embedded Qwen2.5-Coder-0.5B-Instruct with its shipped head.
Environment (defaults): NANOSPEC_MODEL ('embedded'), NANOSPEC_DTYPE (auto: measured, machine.py), NANOSPEC_HEAD
(the shipped head), NANOSPEC_QUESTIONS (Benchmark tab), NANOSPEC_ANY_MODEL=1 (hub ids, local folders), NANOSPEC_CACHE
(cache.py), NANOSPEC_REFRESH ('TEXTS_S,CHARTS_S' while running; default: by where the page is drawn,
views/live_view.py), GRADIO_SERVER_NAME / _PORT. Wiring only: runs in nanospec_core.compare, views in
nanospec_core.views.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

try:  # ZeroGPU Spaces: `spaces` before torch (it patches CUDA's start), GPU time per call sized from the request
    import spaces
except ImportError:  # everywhere else the decorator below changes nothing
    spaces = None

import gradio as gr
import torch

from nanospec_core.views import app_costs, live_view, locality_view, ui, zero_gpu
from nanospec_core.compare import RunTrace, compare_runs, lanes
from nanospec_core.config import METHODS
from nanospec_core.decode_thread import call as on_decode, let_server_send, on_decode_thread  # one decode thread
from nanospec_core.errors import NanoSpecError
from nanospec_core.machine import on_zero_gpu
from nanospec_core.paths import ASSETS, DEFAULT_QUESTIONS
from nanospec_core.views.round_view import round_view
from nanospec_core.session import Session
from nanospec_core.views.session_cache import SessionCache

GPU = (lambda duration: spaces.GPU(duration=duration)) if spaces else (lambda duration: lambda fn: fn)  # noqa: E731
MODEL = os.environ.get("NANOSPEC_MODEL", "embedded")
DTYPE = os.environ.get("NANOSPEC_DTYPE", "auto")  # Session picks the fastest dtype measured on the device
HEAD = os.environ.get("NANOSPEC_HEAD") or None
ANY_MODEL = os.environ.get("NANOSPEC_ANY_MODEL", "") == "1"
QUESTIONS = str(DEFAULT_QUESTIONS)  # NANOSPEC_QUESTIONS overrides it (nanospec_core/paths.py)
REFRESH = os.environ.get("NANOSPEC_REFRESH")  # 'TEXTS_S,CHARTS_S' while running; default: views/live_view.py
SETTINGS = list(ui.LIMITS)  # max_new_tokens, temperature, seed, depth, top_k, total_tokens, capacity, ...
OUTPUTS = ["plain_text", "eagle_text", "nanospec_text", "status", "identical", "summary", "why", "vocab_plot",
           "latency_plot", "locality", "growth_plot", "origins", "round_slider", "nanospec_tree", "eagle_tree",
           "round_details", "rounds"]  # order of the compare handler's updates; /compare returns all but `rounds`

SESSIONS = SessionCache(MODEL, DTYPE, HEAD, any_model=ANY_MODEL)


def user_error(error: Exception) -> gr.Error:
    """NanoSpecError -> its one line; anything else -> its type and first line (traceback to the server log)."""
    if isinstance(error, NanoSpecError):
        return gr.Error(str(error))
    traceback.print_exc()
    first = (str(error).strip().splitlines() or [""])[0]
    return gr.Error(f"generation failed: {type(error).__name__}: {first}")


def prepare(prompt, model, values: dict, precision=None):
    """Checked inputs -> (session, prompt ids, gen, tree, vocab, (model, dtype)); gr.Error with one clear line if
    anything is off."""
    try:
        prompt = ui.check_prompt(prompt)
        model = ui.check_model_name(model)
        gen, tree, vocab = ui.parse_settings(**values)
        dtype = ui.check_precision(precision, SESSIONS.dtype) if precision is not None else SESSIONS.dtype
        if not SESSIONS.loaded(model, dtype):
            gr.Info(f"Loading model '{model}' ({dtype}; first use, this can take a minute) ...")
        session = SESSIONS.get(model, dtype)
        if model in SESSIONS.notes and model != SESSIONS.default_model:  # the default's note is the banner
            gr.Warning(SESSIONS.notes[model])
        return session, session.encode(prompt), gen, tree, vocab, (model, dtype)
    except Exception as error:  # noqa: BLE001 - every failure becomes a message; the app stays up
        raise user_error(error) from None


D = ui.DEFAULTS


@GPU(zero_gpu.compare_seconds)
def compare(prompt: str, model: str = MODEL, max_new_tokens=D["max_new_tokens"], temperature=D["temperature"],
            seed=D["seed"], depth=D["depth"], top_k=D["top_k"], total_tokens=D["total_tokens"],
            capacity=D["capacity"], prompt_topk=D["prompt_topk"], node_topk=D["node_topk"],
            static_core=D["static_core"], fallback_threshold=D["fallback_threshold"],
            precision=next(iter(ui.PRECISIONS)), copies=ui.COPIES, request: gr.Request = None):
    """Stream the three lanes a round each in turn (copies: EAGLE lanes with copy branches); precision: see ui;
    request (Gradio's): where the page is drawn sets how often it refreshes (live_view.choose_refresh)."""
    arguments = dict(locals())
    values = {name: arguments[name] for name in SETTINGS}
    session, prompt_ids, gen, tree, vocab, key = prepare(prompt, model, values, precision)
    try:
        host = request.client.host if request is not None and request.client else None
        refresh = live_view.choose_refresh(host, live_view.usable_cores(), torch.get_num_threads(), REFRESH)
    except NanoSpecError as error:
        raise user_error(error) from None
    view = live_view.View(session, gen, vocab.capacity, prompt_ids, key, tree, lanes(bool(copies)), refresh)
    runs = on_decode_thread(compare_runs(session, prompt_ids, gen, tree, vocab, methods=view.methods))
    started = time.perf_counter()
    try:
        for snap in runs:
            if view.due(snap.done):
                update = view.render(snap, snap.done)
                yield tuple(update.get(name, gr.skip()) for name in OUTPUTS)
                view.send_s += let_server_send() or 0.0  # that update's json goes out before the next round
        profile = ui.profile_line(snap.traces, view.render_s, time.perf_counter() - started, view.send_s)
        print(f"nanospec app: profile {profile}", flush=True)  # where the handler's time went (app_bench reads it)
    except Exception as error:  # noqa: BLE001
        raise user_error(error) from None
    finally:
        runs.close()  # Stop closes this generator between rounds; this frees every run's caches right away


def show_round(rounds, round_number):
    """The round view for the slider's round, from the traces the last comparison left in the `rounds` state."""
    if not rounds:
        return gr.skip(), gr.skip(), "Run a comparison first."
    try:
        (model, dtype), traces = rounds
        session = SESSIONS.get(model, dtype)
        view = round_view(traces[2], traces[1], round_number, session.decode, session.target.vocab_size)
    except Exception as error:  # noqa: BLE001
        raise user_error(error) from None
    return view.nanospec_figure, view.eagle_figure, view.details


def question_categories() -> list[str]:
    try:
        from nanospec_core.bench.runner import load_questions

        return list(dict.fromkeys(q.category for q in load_questions(QUESTIONS)))
    except Exception:  # noqa: BLE001 - the tab explains what is missing
        return []


@GPU(zero_gpu.benchmark_seconds)
def benchmark(categories, limit, max_new_tokens, methods, model, *settings, progress=gr.Progress()):
    """A small Spec-Bench run through nanospec_core.bench.runner: its markdown tables and two charts."""
    from nanospec_core.bench.runner import load_questions, run_benchmark

    values = {name: value for name, value in zip(SETTINGS, settings)}
    values["max_new_tokens"] = max_new_tokens
    precision = settings[len(SETTINGS)] if len(settings) > len(SETTINGS) else None
    try:
        if not methods:
            raise NanoSpecError("pick at least one method")
        if not os.path.isfile(QUESTIONS):
            raise NanoSpecError(f"the questions file {QUESTIONS} is missing: set NANOSPEC_QUESTIONS")
        gen, tree, vocab = ui.parse_settings(**values)
        questions = load_questions(QUESTIONS, list(categories or []) or None, int(limit))
        dtype = ui.check_precision(precision, SESSIONS.dtype) if precision is not None else None
        session = SESSIONS.get(ui.check_model_name(model), dtype)
        result = on_decode(run_benchmark, session, questions, list(methods), gen, tree, vocab,
                           progress=lambda fraction, text: progress(fraction, desc=text))
    except Exception as error:  # noqa: BLE001
        raise user_error(error) from None
    figures = result.figures()
    return result.table_markdown(), figures.get("speedup"), figures.get("draft_split")


def slider(name: str, label: str, step=1, info: str | None = None, value=None):
    low, high, _ = ui.LIMITS[name]
    value = ui.DEFAULTS[name] if value is None else min(max(value, low), high)
    return gr.Slider(low, high, value=value, step=step, label=label, info=info)


def settings_controls(tree: dict, tree_info: str | None) -> list:
    """The Settings accordion's controls, in SETTINGS order; the tree sliders start at the measured tree."""
    with gr.Accordion("Settings", open=False):
        with gr.Row():
            controls = [slider("max_new_tokens", "max new tokens"),
                        slider("temperature", "temperature", 0.05, "0 = greedy: all outputs must match"),
                        gr.Number(ui.DEFAULTS["seed"], label="seed", precision=0)]
        with gr.Row():
            controls += [slider("depth", "tree depth", info=tree_info, value=tree.get("depth")),
                         slider("top_k", "tree top-k", value=tree.get("top_k")),
                         slider("total_tokens", "tree total tokens", value=tree.get("total_tokens"))]
        with gr.Row():
            controls += [slider("capacity", "NanoSpec capacity", 64, "rows of the active set"),
                         slider("prompt_topk", "prompt top-k"), slider("node_topk", "node top-k"),
                         slider("static_core", "static core", 256, "always-active frequent ids"),
                         slider("fallback_threshold", "fallback threshold", 0.05,
                                "full-vocab round under this hit rate; 0 = off")]
    return controls


def empty_charts() -> dict:
    """The charts before any run, axes for the default settings: the frames are in place (and plotly.js loaded)."""
    left, right = RunTrace("eagle"), RunTrace("nanospec")
    axes = ui.ChartAxes(ui.DEFAULTS["max_new_tokens"], ui.DEFAULTS["capacity"])
    return {"vocab_plot": ui.vocab_hit_figure(right, axes), "latency_plot": ui.latency_figure(left, right, axes),
            "growth_plot": locality_view.growth_figure(right, axes.max_new_tokens)}


def build_app(banner: str = "", session: Session | None = None) -> gr.Blocks:
    """The Blocks app; `session` (the default model's) sets the tree sliders to its measured tree choice."""
    charts = empty_charts()
    measured = session is not None and not on_zero_gpu()  # ZeroGPU: no kernels outside @spaces.GPU calls
    tree = vars(session.tree_choice().tree) if measured else {}
    tree_info = session.tree_choice().reason if measured else None
    with gr.Blocks(title="NanoSpec: speculative decoding with a tiny vocabulary", analytics_enabled=False) as demo:
        gr.Markdown("# NanoSpec\nEAGLE speculative decoding (EAGLE-2's dynamic tree and the model's shipped head) whose "
                    "draft head scores only the few hundred to few thousand token ids **of this context** instead of "
                    "the whole vocabulary. Training-free, lossless (the target verifies every token), built for "
                    "CPUs. Three lanes on the same machine, one round each in turn so their timings are fair: the "
                    "target alone (no speculation), plain EAGLE, and EAGLE + NanoSpec. With *copy branches* on, both "
                    "EAGLE lanes also draft spans copied from the context (phrases re-used, not just token ids).")
        gr.Markdown(f"**Warning:** {banner}", visible=bool(banner), elem_classes="nanospec-banner")
        with gr.Tab("Compare"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", lines=4, scale=4, elem_id="prompt",
                                    placeholder="Ask something, or pick an example below")
                with gr.Column(scale=1, min_width=220):
                    model = gr.Dropdown(SESSIONS.choices, value=SESSIONS.default_model, label="Model",
                                        allow_custom_value=True, info="loaded on first use (at most 2 kept)")
                    precision = gr.Radio(list(ui.PRECISIONS), value=next(iter(ui.PRECISIONS)), label="Precision",
                                         elem_id="precision",
                                         info="fastest: the dtype measured fastest here; float32: outputs equal "
                                              "plain greedy decoding token for token")
                    copies = gr.Checkbox(ui.COPIES, label="copy branches", elem_id="copies",
                                         info="both EAGLE lanes also draft spans copied from the context")
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            gr.Examples([[p] for _, p in ui.EXAMPLES], inputs=[prompt], example_labels=[k for k, _ in ui.EXAMPLES],
                        cache_examples=False, label="Examples (code, chat, math, summarisation, translation)")
            controls = settings_controls(tree, tree_info)
            forecast = ui.forecast(app_costs.forecast_for(session, session.tree_choice().tree, lanes(ui.COPIES)[2])
                                   ) if measured else ""
            status = gr.Markdown(forecast, elem_id="status")
            summary = gr.Dataframe(label="Speed (vs plain decoding: the target alone; vs EAGLE: the same tree with "
                                         "the full-vocabulary draft lm head)", interactive=False, elem_id="summary")
            with gr.Row(equal_height=True):
                text_box = lambda label, key: gr.Textbox(  # noqa: E731
                    label=label, lines=10, max_lines=20, interactive=False, elem_id=key, buttons=["copy"])
                plain_text = text_box("Plain decoding (no speculation)", "plain-output")
                eagle_text, nanospec_text = (text_box(ui.lane_label(method), f"{lane}-output") for method, lane
                                             in zip(lanes(ui.COPIES)[1:], ("eagle", "nanospec")))
            identical = gr.Markdown(elem_id="identical")
            why = gr.Markdown(elem_id="why")
            locality = gr.HighlightedText(label="NanoSpec's output by where each token's id entered the active set "
                                                "(red, a miss: outside it, the draft could not have proposed it)",
                                          color_map=locality_view.LOCALITY_COLORS, show_legend=True,
                                          combine_adjacent=False, elem_id="locality")
            with gr.Group():
                gr.Markdown("### One round, drafted and verified\nPick a round: the tree NanoSpec's head drafted "
                            "(bold green: the branch the target accepted; star: the target's bonus token, red when "
                            "it was outside the active set), and EAGLE's tree at the same output position.")
                round_slider = gr.Slider(1, 2, value=1, step=1, label="round", interactive=False,
                                         elem_id="round-slider")
                round_details = gr.Markdown("Run a comparison first.", elem_id="round-details")
                with gr.Row():
                    nanospec_tree = gr.Plot(label="NanoSpec's draft tree", show_label=False, elem_id="nanospec-tree")
                    eagle_tree = gr.Plot(label="EAGLE's draft tree", show_label=False, elem_id="eagle-tree")
            with gr.Row():
                vocab_plot = gr.Plot(charts["vocab_plot"], label="Active vocabulary", show_label=False)
                latency_plot = gr.Plot(charts["latency_plot"], label="Draft latency", show_label=False)
        with gr.Tab("Temporal locality"):
            gr.Markdown(locality_view.LOCALITY_NOTE)
            with gr.Row():
                growth_plot = gr.Plot(charts["growth_plot"], label="Growth of the active set", show_label=False,
                                      scale=3)
                origins = gr.Dataframe(label="Committed tokens by origin (NanoSpec)", interactive=False, scale=1,
                                       elem_id="origins")
        with gr.Tab("Benchmark"):
            categories = question_categories()
            gr.Markdown(f"A small Spec-Bench selection (first turns of `{QUESTIONS}`), every method on every prompt "
                        "in alternation, after a warm-up. It uses the Compare tab's model and settings. On a CPU "
                        "keep it small: each prompt runs once per method." if categories else
                        f"**The questions file `{QUESTIONS}` is missing or unreadable**: set NANOSPEC_QUESTIONS.")
            with gr.Row():
                bench_categories = gr.CheckboxGroup(categories, label="categories (none = all)", value=[
                    c for c in ("coding", "math_reasoning", "translation", "summarization") if c in categories])
                with gr.Column():
                    bench_limit = gr.Slider(1, 5, value=1, step=1, label="prompts per category")
                    bench_tokens = gr.Slider(8, 256, value=64, step=8, label="max new tokens")
                    bench_methods = gr.CheckboxGroup(list(METHODS),
                                                     value=["eagle", "nanospec"], label="methods (first = baseline)")
            run_bench = gr.Button("Run benchmark", variant="primary", interactive=bool(categories))
            bench_table = gr.Markdown()
            with gr.Row():
                bench_speedup, bench_split = gr.Plot(show_label=False), gr.Plot(show_label=False)

        rounds = gr.State()
        outputs = {"plain_text": plain_text, "eagle_text": eagle_text, "nanospec_text": nanospec_text,
                   "status": status, "identical": identical, "summary": summary, "why": why, "vocab_plot": vocab_plot,
                   "latency_plot": latency_plot, "locality": locality, "growth_plot": growth_plot,
                   "origins": origins, "round_slider": round_slider, "nanospec_tree": nanospec_tree,
                   "eagle_tree": eagle_tree, "round_details": round_details, "rounds": rounds}
        run = generate.click(compare, [prompt, model, *controls, precision, copies], [outputs[n] for n in OUTPUTS],
                             api_name="compare", concurrency_id="cpu", show_progress="minimal")
        round_slider.input(show_round, [rounds, round_slider], [nanospec_tree, eagle_tree, round_details],
                           api_visibility="private", trigger_mode="always_last", concurrency_limit=None,
                           show_progress="hidden")
        stop.click(None, None, None, cancels=[run], api_visibility="private")
        copies.change(lambda on: [gr.Textbox(label=ui.lane_label(m)) for m in lanes(on)[1:]], copies,
                      [eagle_text, nanospec_text], api_visibility="private", show_progress="hidden")
        run_bench.click(benchmark, [bench_categories, bench_limit, bench_tokens, bench_methods, model, *controls,
                                    precision],
                        [bench_table, bench_speedup, bench_split], api_name="benchmark", concurrency_id="cpu")
    return demo


def warm_up(session: Session) -> None:
    """One short comparison, thrown away: first-call costs (allocator, kernels) stay out of the first user's run."""
    started = time.perf_counter()
    gen, tree, vocab = ui.parse_settings(max_new_tokens=8)
    on_decode(lambda: list(compare_runs(session, session.encode("Hello"), gen, tree, vocab, lanes(ui.COPIES), False)))
    print(f"nanospec app: warmed up in {time.perf_counter() - started:.1f} s", flush=True)


def main() -> None:
    try:
        session = SESSIONS.get(MODEL)
        if not on_zero_gpu():  # on ZeroGPU the GPU exists only inside the decorated calls
            warm_up(session)
    except NanoSpecError as error:
        sys.exit(f"nanospec app: {error}")
    banner = SESSIONS.notes.get(MODEL, "")
    if banner:
        print(f"nanospec app: WARNING: {banner}", flush=True)
    demo = build_app(banner, session)
    demo.queue(default_concurrency_limit=1, max_size=16)
    demo.launch(css_paths=[ASSETS / "app.css"])  # host and port: GRADIO_SERVER_NAME / _PORT


if __name__ == "__main__":
    main()

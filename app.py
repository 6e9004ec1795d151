"""NanoSpec demo: plain EAGLE and EAGLE + NanoSpec side by side (EAGLE-2's dynamic tree, the shipped head), on CPU.

    python app.py                      # the embedded Qwen2.5-Coder-0.5B-Instruct with its shipped head
    NANOSPEC_MODEL=/path/to/model NANOSPEC_HEAD=random NANOSPEC_DTYPE=float32 python app.py

Environment: NANOSPEC_MODEL (default 'embedded'), NANOSPEC_DTYPE (default auto: the dtype measured fastest on this
machine, nanospec_core/machine.py; the app's Precision control switches to float32 per run), NANOSPEC_HEAD
(default: the shipped default head, paths.HEAD_KINDS; else a random one with a warning banner),
NANOSPEC_QUESTIONS (the Spec-Bench file of the Benchmark tab), NANOSPEC_ANY_MODEL=1 (let users load hub ids and
local folders, not only the packaged models), GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (read by Gradio).
Layout and wiring only: the alternating runs are nanospec_core.compare, the charts and tables nanospec_core.ui.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections import OrderedDict

import gradio as gr

from nanospec_core import ui
from nanospec_core.compare import RunTrace, compare_runs, first_difference, top2_margin
from nanospec_core.config import METHODS, GenerationConfig
from nanospec_core.errors import NanoSpecError
from nanospec_core.machine import on_zero_gpu
from nanospec_core.models.loading import PACKAGED, model_key
from nanospec_core.paths import ASSETS, DEFAULT_QUESTIONS, shipped_head_dir
from nanospec_core.session import Session

try:  # Hugging Face ZeroGPU Spaces: request a GPU for the generation function; a no-op everywhere else
    import spaces

    GPU = spaces.GPU
except ImportError:
    def GPU(fn):
        return fn

MODEL = os.environ.get("NANOSPEC_MODEL", "embedded")
DTYPE = os.environ.get("NANOSPEC_DTYPE", "auto")  # Session picks the fastest dtype measured on the device
HEAD = os.environ.get("NANOSPEC_HEAD") or None
ANY_MODEL = os.environ.get("NANOSPEC_ANY_MODEL", "") == "1"
QUESTIONS = str(DEFAULT_QUESTIONS)  # NANOSPEC_QUESTIONS overrides it (nanospec_core/paths.py)
UPDATE_EVERY_S = 0.25  # texts and table refresh at most this often (the last round always shows)
CHART_EVERY_S = 1.5  # charts and the locality view: plotly redraws are the browser's heaviest work
SETTINGS = list(ui.LIMITS)  # max_new_tokens, temperature, seed, depth, top_k, total_tokens, capacity, ...
OUTPUTS = ["eagle_text", "nanospec_text", "status", "identical", "summary", "vocab_plot", "latency_plot",
           "locality", "growth_plot"]  # order of the compare handler's updates (and of /compare's outputs)

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


class SessionCache:
    """Loaded sessions by model name (at most `size`, least recently used dropped), with a head fallback note."""

    def __init__(self, default_model: str = MODEL, dtype: str = DTYPE, head: str | None = HEAD, size: int = 2,
                 any_model: bool = ANY_MODEL):
        self.default_model, self.dtype, self.head, self.size = default_model, dtype, head, size
        by_key: dict[str, str] = {}  # one name per distinct model ('embedded' is qwen2.5-coder-0.5b)
        for name in (default_model, *PACKAGED):
            by_key.setdefault(model_key(name), name)
        self.choices = list(by_key.values())  # what a public demo may load
        self.any_model = any_model  # also hub ids and local folders (downloads, disk: off unless asked for)
        self.sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()  # (model, dtype) -> session
        self.notes: dict[str, str] = {}  # model -> warning shown with its results (random head)
        self.lock = threading.Lock()

    def head_for(self, model: str) -> str | None:
        if model == self.default_model and self.head:
            return self.head
        if (shipped_head_dir(model_key(model)) / "config.json").exists():
            return None
        self.notes[model] = (f"No trained EAGLE head ships for model '{model}': it runs with a RANDOM head, so "
                             "few drafts are accepted and the speedups shown are not representative.")
        return "random"

    def loaded(self, model: str, dtype: str | None = None) -> bool:
        return (model, dtype or self.dtype) in self.sessions

    def get(self, model: str, dtype: str | None = None) -> Session:
        """The session of `model` in `dtype` ('auto' = measured fastest, 'float32'), loaded on first use; the
        device is auto: CUDA where there is a GPU."""
        dtype = dtype or self.dtype
        with self.lock:
            if (model, dtype) in self.sessions:
                self.sessions.move_to_end((model, dtype))
                return self.sessions[(model, dtype)]
            if not self.any_model and model not in self.choices:
                raise NanoSpecError(f"model '{model}' is not served here: choose {', '.join(self.choices)} "
                                    "(NANOSPEC_ANY_MODEL=1 also allows hub ids and local folders)")
            print(f"nanospec app: loading model '{model}' ({dtype}) ...", flush=True)
            started = time.perf_counter()
            session = Session(model, dtype=dtype, device="auto", head=self.head_for(model))
            session.head  # load the draft head now: a bad head fails here, not mid-run
            print(f"nanospec app: {session.runtime.describe()}", flush=True)
            if not on_zero_gpu():  # measuring the tree runs kernels: on ZeroGPU only inside @spaces.GPU calls
                choice = session.tree_choice()
                print(f"nanospec app: tree {vars(choice.tree)} ({choice.reason})", flush=True)
            self.sessions[(model, dtype)] = session
            while len(self.sessions) > self.size:
                self.sessions.popitem(last=False)
            print(f"nanospec app: '{model}' ready in {time.perf_counter() - started:.1f} s", flush=True)
            return session


SESSIONS = SessionCache()


def user_error(error: Exception) -> gr.Error:
    """NanoSpecError -> its one line; anything else -> its type and first line (traceback to the server log)."""
    if isinstance(error, NanoSpecError):
        return gr.Error(str(error))
    traceback.print_exc()
    first = (str(error).strip().splitlines() or [""])[0]
    return gr.Error(f"generation failed: {type(error).__name__}: {first}")


def check_precision(label) -> str:
    if label in ui.PRECISIONS.values():
        return label
    if label not in ui.PRECISIONS:
        raise NanoSpecError(f"precision must be one of {', '.join(ui.PRECISIONS)}, got {label!r}")
    return SESSIONS.dtype if ui.PRECISIONS[label] == "auto" else ui.PRECISIONS[label]


def prepare(prompt, model, values: dict, precision=None):
    """Checked inputs -> (session, prompt ids, gen, tree, vocab); gr.Error with one clear line if anything is off."""
    try:
        prompt = ui.check_prompt(prompt)
        model = ui.check_model_name(model)
        gen, tree, vocab = ui.parse_settings(**values)
        dtype = check_precision(precision) if precision is not None else SESSIONS.dtype
        if not SESSIONS.loaded(model, dtype):
            gr.Info(f"Loading model '{model}' ({dtype}; first use, this can take a minute) ...")
        session = SESSIONS.get(model, dtype)
        if model in SESSIONS.notes and model != SESSIONS.default_model:  # the default's note is the banner
            gr.Warning(SESSIONS.notes[model])
        return session, session.encode(prompt), gen, tree, vocab
    except Exception as error:  # noqa: BLE001 - every failure becomes a message; the app stays up
        raise user_error(error) from None


class View:
    """Turns ComparePairs into the compare outputs; keeps the axes and the decoded locality pieces between rounds.

    Texts, status and table refresh every UPDATE_EVERY_S; the charts and the locality view (heavier to send and to
    draw in the browser) every CHART_EVERY_S, and always with the last round.
    """

    def __init__(self, session: Session, gen: GenerationConfig, capacity: int, prompt_ids=None):
        self.session, self.gen, self.prompt_ids = session, gen, prompt_ids
        self.axes = ui.ChartAxes(gen.max_new_tokens, capacity)
        self.pieces: list[str] = []
        self.last_update = self.last_charts = 0.0

    def due(self, done: bool) -> bool:
        return done or time.perf_counter() - self.last_update >= UPDATE_EVERY_S

    def margin(self, left, right, done: bool) -> float | None:
        """The target's top-2 logit margin at the first greedy difference, once both runs are done."""
        if not done or self.gen.temperature > 0 or self.prompt_ids is None:
            return None
        position = first_difference(left.token_ids, right.token_ids)
        if position is None or position >= min(len(left.token_ids), len(right.token_ids)):
            return None
        return top2_margin(self.session.target, self.prompt_ids, left.token_ids[:position])[0]

    def render(self, left, right, done: bool) -> tuple:
        now = self.last_update = time.perf_counter()
        dtype = str(self.session.dtype).removeprefix("torch.")
        values = {
            "eagle_text": left.text, "nanospec_text": right.text,
            "status": ui.status_line(left, right, runtime=self.session.runtime.describe()),
            "identical": ui.identity_check(left, right, self.gen.temperature, self.session.decode, dtype,
                                           self.margin(left, right, done)),
            "summary": ui.summary_frame(left, right),
        }
        if done or now - self.last_charts >= CHART_EVERY_S:
            self.last_charts = now
            self.axes.fit(left, right)
            self.pieces += ui.token_pieces(self.session.decode, right.token_ids, start=len(self.pieces))
            values.update({
                "vocab_plot": ui.vocab_hit_figure(right, self.axes, self.session.target.vocab_size),
                "latency_plot": ui.latency_figure(left, right, self.axes),
                "locality": ui.locality_spans(self.pieces, ui.token_labels(right)),
                "growth_plot": ui.growth_figure(right, self.gen.max_new_tokens, self.axes.capacity),
            })
        return tuple(values.get(name, gr.skip()) for name in OUTPUTS)


D = ui.DEFAULTS


@GPU
def compare(prompt: str, model: str = MODEL, max_new_tokens=D["max_new_tokens"], temperature=D["temperature"],
            seed=D["seed"], depth=D["depth"], top_k=D["top_k"], total_tokens=D["total_tokens"],
            capacity=D["capacity"], prompt_topk=D["prompt_topk"], node_topk=D["node_topk"],
            static_core=D["static_core"], fallback_threshold=D["fallback_threshold"],
            precision=next(iter(ui.PRECISIONS))):
    """Stream plain EAGLE and EAGLE + NanoSpec, alternating rounds; the last update carries both final texts.
    precision: a ui.PRECISIONS label (or 'auto' / 'float32')."""
    arguments = dict(locals())
    values = {name: arguments[name] for name in SETTINGS}
    session, prompt_ids, gen, tree, vocab = prepare(prompt, model, values, precision)
    view = View(session, gen, vocab.capacity, prompt_ids)
    runs = compare_runs(session, prompt_ids, gen, tree, vocab)
    try:
        for pair in runs:
            if view.due(pair.done):
                yield view.render(pair.left, pair.right, pair.done)
    except Exception as error:  # noqa: BLE001
        raise user_error(error) from None
    finally:
        runs.close()  # Stop closes this generator between rounds; this frees both runs' caches right away


def question_categories() -> list[str]:
    try:
        from nanospec_core.bench.runner import load_questions

        return list(dict.fromkeys(q.category for q in load_questions(QUESTIONS)))
    except Exception:  # noqa: BLE001 - the tab explains what is missing
        return []


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
        dtype = check_precision(precision) if precision is not None else None
        session = SESSIONS.get(ui.check_model_name(model), dtype)
        result = run_benchmark(session, questions, list(methods), gen, tree, vocab,
                               progress=lambda fraction, text: progress(fraction, desc=text))
    except Exception as error:  # noqa: BLE001
        raise user_error(error) from None
    figures = result.figures()
    return result.table_markdown(), figures.get("speedup"), figures.get("draft_split")


def slider(name: str, label: str, step=1, info: str | None = None, value=None):
    low, high, _ = ui.LIMITS[name]
    value = ui.DEFAULTS[name] if value is None else min(max(value, low), high)
    return gr.Slider(low, high, value=value, step=step, label=label, info=info)


def empty_charts() -> dict:
    """The charts before any run, axes for the default settings: the frames are in place (and plotly.js loaded)."""
    left, right = RunTrace("eagle"), RunTrace("nanospec")
    axes = ui.ChartAxes(ui.DEFAULTS["max_new_tokens"], ui.DEFAULTS["capacity"])
    return {"vocab_plot": ui.vocab_hit_figure(right, axes), "latency_plot": ui.latency_figure(left, right, axes),
            "growth_plot": ui.growth_figure(right, axes.max_new_tokens, axes.capacity)}


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
                    "CPUs. Left: plain EAGLE. Right: EAGLE + NanoSpec. Both run on the same machine, one round each "
                    "in turn, so their timings are fair.")
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
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            gr.Examples([[p] for _, p in EXAMPLES], inputs=[prompt], example_labels=[k for k, _ in EXAMPLES],
                        cache_examples=False, label="Examples (code, chat, math, summarisation, translation)")
            with gr.Accordion("Settings", open=False):
                with gr.Row():
                    controls = [slider("max_new_tokens", "max new tokens"),
                                slider("temperature", "temperature", 0.05, "0 = greedy: both outputs must match"),
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
            status = gr.Markdown(elem_id="status")
            with gr.Row(equal_height=True):
                eagle_text = gr.Textbox(label="Plain EAGLE", lines=12, max_lines=24, interactive=False,
                                        elem_id="eagle-output", buttons=["copy"])
                nanospec_text = gr.Textbox(label="EAGLE + NanoSpec", lines=12, max_lines=24, interactive=False,
                                           elem_id="nanospec-output", buttons=["copy"])
            identical = gr.Markdown(elem_id="identical")
            summary = gr.Dataframe(label="Summary (speedup = NanoSpec tokens/s over EAGLE's)", interactive=False)
            with gr.Row():
                vocab_plot = gr.Plot(charts["vocab_plot"], label="Active vocabulary", show_label=False)
                latency_plot = gr.Plot(charts["latency_plot"], label="Draft latency", show_label=False)
        with gr.Tab("Temporal locality"):
            gr.Markdown("NanoSpec's output, each token coloured by where its id entered the active set (red: it was "
                        "not in the set, the target supplied it). Run a comparison first.")
            locality = gr.HighlightedText(label="NanoSpec output by token origin", color_map=ui.LOCALITY_COLORS,
                                          show_legend=True, combine_adjacent=False, elem_id="locality")
            growth_plot = gr.Plot(charts["growth_plot"], label="Growth of the active set", show_label=False)
            gr.Markdown(ui.LOCALITY_NOTE)
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

        outputs = {"eagle_text": eagle_text, "nanospec_text": nanospec_text, "status": status,
                   "identical": identical, "summary": summary, "vocab_plot": vocab_plot,
                   "latency_plot": latency_plot, "locality": locality, "growth_plot": growth_plot}
        run = generate.click(compare, [prompt, model, *controls, precision], [outputs[name] for name in OUTPUTS],
                             api_name="compare", concurrency_id="cpu", show_progress="minimal")
        stop.click(None, None, None, cancels=[run], api_visibility="private")
        run_bench.click(benchmark, [bench_categories, bench_limit, bench_tokens, bench_methods, model, *controls,
                                    precision],
                        [bench_table, bench_speedup, bench_split], api_name="benchmark", concurrency_id="cpu")
    return demo


def warm_up(session: Session) -> None:
    """One short comparison, thrown away: first-call costs (allocator, kernels) stay out of the first user's run."""
    started = time.perf_counter()
    gen, tree, vocab = ui.parse_settings(max_new_tokens=8)
    for _ in compare_runs(session, session.encode("Hello"), gen, tree, vocab, decode_text=False):
        pass
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

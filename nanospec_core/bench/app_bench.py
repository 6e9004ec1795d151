"""The app against the engine: each lane's tokens/s and round cost inside the launched app, next to the same
prompt outside it, and the forecast the app shows next to what the app measured.

    python -m nanospec_core app-bench --examples 6 --max-new-tokens 128 --out bench_out/app

Per example (the app's own, views/ui.EXAMPLES), in this order, nothing else running:
  1. `cli`: each lane alone, as `generate --method ...` runs it (Session.run);
  2. `outside`: the three lanes alternated round by round by compare_runs, as the app does, in this process;
  3. `app`: `python app.py` in a subprocess, driven over HTTP by gradio_client (no browser), its final summary read
     back. The server is started once, after the references, so the two never share the cores.
`app / cli` is the issue's figure; `app / outside` isolates what the app adds around the same rounds. Ratios are
within one run on one machine: compare them, not tokens/s across machines.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..compare import DEFAULT_METHODS, compare_runs
from ..errors import NanoSpecError


def add_arguments(parser) -> None:
    parser.add_argument("--examples", type=int, default=6, help="the first N of the app's examples")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="app runs per example (the best is kept)")
    parser.add_argument("--out", default=None, help="output folder (default: bench_out/app_<timestamp>)")


def lane_rows(summaries: dict) -> dict[str, dict]:
    """method -> tokens/s and ms per round (prefill left out) from RunSummary objects."""
    return {method: {"tokens_per_s": s.tokens_per_s, "rounds": s.rounds, "new_tokens": s.new_tokens,
                     "ms_per_round": 1e3 * (s.wall_s - s.prefill_s) / s.rounds if s.rounds else None}
            for method, s in summaries.items()}


def frame_rows(frame) -> dict[str, dict]:
    """The app's summary table as gradio_client returns it ({headers, data}) -> method label -> row."""
    headers, data = frame["headers"], frame["data"]
    rows = [dict(zip(headers, row)) for row in data]
    return {row["method"]: {"tokens_per_s": row["tokens/s"], "rounds": row["rounds"], "new_tokens": row["new tokens"],
                            "ms_per_round": row["ms/round"]} for row in rows}


def through_app(client, prompt: str, values: dict) -> dict[str, dict]:
    import app  # the repository's app module: its output order and control names

    from ..views import ui

    outputs = client.predict(prompt, app.MODEL, *(values[name] for name in app.SETTINGS), next(iter(ui.PRECISIONS)),
                             api_name="/compare")
    labelled = frame_rows(outputs[app.OUTPUTS.index("summary")])
    return {method: labelled[ui.lane_label(method)] for method in DEFAULT_METHODS}


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def markdown(results: list[dict], machine: str) -> str:
    lines = [f"machine: {machine}", "",
             "| example | lane | cli tok/s | outside tok/s | app tok/s | app / cli | app / outside | "
             "cli ms/round | app ms/round |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for method in DEFAULT_METHODS:
            c, o, a = r["cli"][method], r["outside"][method], r["app"][method]
            lines.append(f"| {r['example']} | {method} | {c['tokens_per_s']:.2f} | {o['tokens_per_s']:.2f} | "
                         f"{a['tokens_per_s']:.2f} | {ratio(a['tokens_per_s'], c['tokens_per_s'])} | "
                         f"{ratio(a['tokens_per_s'], o['tokens_per_s'])} | {c['ms_per_round']:.1f} | "
                         f"{a['ms_per_round']:.1f} |")
    lines += ["", "| example | forecast plain step ms | app plain step ms | forecast / app | forecast round ms | "
                  "app NanoSpec round ms | forecast / app |", "|---|---|---|---|---|---|---|"]
    for r in results:
        f, plain, round_ = r["forecast"], r["app"]["vanilla"]["ms_per_round"], r["app"]["nanospec"]["ms_per_round"]
        lines.append(f"| {r['example']} | {f['plain_ms']:.1f} | {plain:.1f} | {ratio(f['plain_ms'], plain)} | "
                     f"{f['round_ms']:.1f} | {round_:.1f} | {ratio(f['round_ms'], round_)} |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from gradio_client import Client

    from ..session import Session
    from ..views import ui
    from .app_server import AppServer

    if not 1 <= args.examples <= len(ui.EXAMPLES):
        raise NanoSpecError(f"--examples must be 1..{len(ui.EXAMPLES)}")
    out = Path(args.out or f"bench_out/app_{time.strftime('%Y%m%d_%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    session = Session(args.model, dtype=args.dtype, device=args.device)
    tree = session.tree_choice().tree  # what the app's sliders start at
    values = {**ui.DEFAULTS, "max_new_tokens": args.max_new_tokens, **vars(tree)}
    gen, tree, vocab = ui.parse_settings(**values)
    prediction = session.tree_prediction(tree)
    examples = ui.EXAMPLES[:args.examples]
    results = []
    for label, prompt in examples:  # 1 and 2: the references, before any server exists
        ids = session.encode(prompt)
        session.run("vanilla", ids, gen)  # warm: first-call costs out of the first figure
        cli = lane_rows({m: session.run(m, ids, gen, tree, vocab).summary for m in DEFAULT_METHODS})
        for snap in compare_runs(session, ids, gen, tree, vocab):
            pass
        outside = lane_rows({t.method: t.summary() for t in snap.traces})
        results.append({"example": label, "cli": cli, "outside": outside,
                        "forecast": {"plain_ms": prediction.plain_ms, "round_ms": prediction.round_ms}})
        print(f"[app-bench] {label}: references done", flush=True)
    machine, dtype = session.runtime.machine, str(session.dtype).removeprefix("torch.")
    del session  # the server loads its own copy
    server = AppServer(args.model, out / "app.log", dtype=dtype, head=args.head, threads=None)
    try:
        client = Client(server.wait_ready(), verbose=False)
        for result, (label, prompt) in zip(results, examples):
            runs = [through_app(client, prompt, values) for _ in range(args.repeats)]
            result["app"] = {m: max((r[m] for r in runs), key=lambda row: row["tokens_per_s"])
                             for m in DEFAULT_METHODS}
            print(f"[app-bench] {label}: app done", flush=True)
    finally:
        server.stop()
    table = markdown(results, machine)
    (out / "app_bench.json").write_text(json.dumps({"machine": machine, "dtype": dtype, "tree": vars(tree),
                                                    "results": results}, indent=1))
    (out / "app_bench.md").write_text(table)
    print(table)
    return 0

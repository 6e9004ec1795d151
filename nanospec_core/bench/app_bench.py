"""The app against the engine: each lane's tokens/s and round cost inside the launched app, next to the same
prompt outside it, and the forecast the app shows next to what the app measured.

    python -m nanospec_core app-bench --examples 6 --max-new-tokens 128 --out bench_out/app

Per example (the app's own, views/ui.EXAMPLES), in this order, nothing else running:
  1. `cli`: each lane alone, as `generate --method ...` runs it (Session.run);
  2. `outside`: the three lanes alternated round by round by compare_runs, as the app does, in this process;
  3. `app`: `python app.py` in a subprocess, driven over HTTP by gradio_client (no browser), its final summary read
     back. The server is started once, before everything, and idles while 1 and 2 run.
`app / cli` is the issue's figure; `app / outside` isolates what the app adds around the same rounds. Ratios are
within one run on one machine: compare them, not tokens/s across machines.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..compare import compare_runs, lanes
from ..errors import NanoSpecError
from ..views import app_costs, ui

LANES = lanes(ui.COPIES)  # the app's default lanes


def add_arguments(parser) -> None:
    parser.add_argument("--examples", type=int, default=6, help="the first N of the app's examples")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="app runs per example (the best is kept)")
    parser.add_argument("--out", default=None, help="output folder (default: bench_out/app_<timestamp>)")
    parser.add_argument("--browser", action="store_true",
                        help="also run each example once in headless chromium on this machine (playwright), as a "
                             "visitor would: the page's own drawing shares the cores")
    parser.add_argument("--refresh", default=None, metavar="TEXTS_S,CHARTS_S",
                        help="the served app's refresh periods while running (NANOSPEC_REFRESH; default: the app's "
                             "own choice, views/live_view.py)")


def lane_rows(summaries: dict) -> dict[str, dict]:
    """method -> tokens/s and ms per round (prefill left out) from RunSummary objects."""
    return {method: {"tokens_per_s": s.tokens_per_s, "rounds": s.rounds, "new_tokens": s.new_tokens,
                     "ms_per_round": s.round_ms}
            for method, s in summaries.items()}


def frame_rows(frame) -> dict[str, dict]:
    """The app's summary table as gradio_client returns it ({headers, data}) -> method label -> row."""
    headers, data = frame["headers"], frame["data"]
    rows = [dict(zip(headers, row)) for row in data]
    return {row["method"]: {"tokens_per_s": row["tokens/s"], "rounds": row["rounds"], "new_tokens": row["new tokens"],
                            "ms_per_round": row["ms/round"]} for row in rows}


def lane_table(frame) -> dict[str, dict]:
    """The app's speed table -> the app's lanes (LANES) -> row: what the HTTP and the browser runs both report."""
    labelled = frame_rows(frame)
    return {method: labelled[ui.lane_label(method)] for method in LANES}


def through_app(client, prompt: str, values: dict, log: Path) -> dict:
    """One comparison over HTTP: the lanes' rows from the final summary, the client's wall time, and the handler's
    own profile line from the server's log (app.py prints one per finished comparison)."""
    import app  # the repository's app module: its output order and control names

    started = time.perf_counter()
    outputs = client.predict(prompt, app.MODEL, *(values[name] for name in app.SETTINGS), next(iter(ui.PRECISIONS)),
                             ui.COPIES, api_name="/compare")
    wall = time.perf_counter() - started
    marker = "nanospec app: profile "
    profiles = [line.split(marker, 1)[1] for line in log.read_text().splitlines() if marker in line]
    return {"lanes": lane_table(outputs[app.OUTPUTS.index("summary")]), "client_s": round(wall, 4),
            "profile": json.loads(profiles[-1]) if profiles else None}


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def markdown(results: list[dict], machine: str) -> str:
    lines = [f"machine: {machine}", "",
             "| example | lane | cli tok/s | outside tok/s | app tok/s | app / cli | app / outside | "
             "cli ms/round | app ms/round |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for method in LANES:
            c, o, a = r["cli"][method], r["outside"][method], r["app"][method]
            lines.append(f"| {r['example']} | {method} | {c['tokens_per_s']:.2f} | {o['tokens_per_s']:.2f} | "
                         f"{a['tokens_per_s']:.2f} | {ratio(a['tokens_per_s'], c['tokens_per_s'])} | "
                         f"{ratio(a['tokens_per_s'], o['tokens_per_s'])} | {c['ms_per_round']:.1f} | "
                         f"{a['ms_per_round']:.1f} |")
    if any("browser" in r for r in results):
        lines += ["", "In a browser: headless chromium on the same machine (playwright), the example's button and "
                      "Generate clicked, the page's speed table read.", "",
                  "`page CPU`: chromium's CPU seconds over the run's wall seconds, in cores.", "",
                  "| example | lane | cli tok/s | browser tok/s | browser / cli | page CPU |",
                  "|---|---|---|---|---|---|"]
        for r in results:
            for method in LANES:
                c, b = r["cli"][method]["tokens_per_s"], r["browser"][method]["tokens_per_s"]
                share = r.get("browser_cpu", {}).get("share") if method == LANES[0] else None
                lines.append(f"| {r['example']} | {method} | {c:.2f} | {b:.2f} | {ratio(b, c)} | "
                             f"{'' if share is None else f'{share:.3f}'} |")
    lines += ["", "Forecast: the cost model's (`model`) and the app's, corrected by its earlier runs here (`shown`, "
                  "views/app_costs.py), against the app's measured plain step and NanoSpec round.", "",
              "| example | plain ms: model / shown / app | model / app | shown / app | round ms: model / shown / app | "
              "model / app | shown / app |", "|---|---|---|---|---|---|---|"]
    for r in results:
        m, f = r["model"], r["forecast"]
        plain, round_ = r["app"][LANES[0]]["ms_per_round"], r["app"][LANES[2]]["ms_per_round"]
        lines.append(f"| {r['example']} | {m['plain_ms']:.1f} / {f['plain_ms']:.1f} / {plain:.1f} | "
                     f"{ratio(m['plain_ms'], plain)} | {ratio(f['plain_ms'], plain)} | "
                     f"{m['round_ms']:.1f} / {f['round_ms']:.1f} / {round_:.1f} | {ratio(m['round_ms'], round_)} | "
                     f"{ratio(f['round_ms'], round_)} |")
    lines += ["", "Where the app's time goes (seconds per comparison; the handler's own profile line, and the client's "
                  "wall time around it):", "",
              "| example | client | handler | lanes' rounds | building updates | waiting for sends | "
              "rest of the handler | server + HTTP |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r.get("profile") or {}
        if "handler_s" in p:
            lines.append(f"| {r['example']} | {p['client_s']:.2f} | {p['handler_s']:.2f} | {p['decode_s']:.2f} | "
                         f"{p['views_s']:.2f} | {p.get('sends_s', 0.0):.2f} | {p['other_s']:.2f} | "
                         f"{p['client_s'] - p['handler_s']:.2f} |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from gradio_client import Client

    from ..session import Session
    from .app_browser import AppBrowser
    from .app_server import AppServer

    if not 1 <= args.examples <= len(ui.EXAMPLES):
        raise NanoSpecError(f"--examples must be 1..{len(ui.EXAMPLES)}")
    if args.browser and args.max_new_tokens != ui.DEFAULTS["max_new_tokens"]:
        raise NanoSpecError(f"--browser runs the page's defaults: --max-new-tokens {ui.DEFAULTS['max_new_tokens']}")
    out = Path(args.out or f"bench_out/app_{time.strftime('%Y%m%d_%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    session = Session(args.model, dtype=args.dtype, device=args.device)
    tree = session.tree_choice().tree  # what the app's sliders start at
    values = {**ui.DEFAULTS, "max_new_tokens": args.max_new_tokens, **vars(tree)}
    gen, tree, vocab = ui.parse_settings(**values)
    prediction, costs = session.tree_prediction(tree), app_costs.key(session, LANES[2])
    examples = ui.EXAMPLES[:args.examples]
    machine, dtype = session.runtime.machine, str(session.dtype).removeprefix("torch.")
    results = []
    # The server starts first and idles while the references run (an idle Gradio server takes no CPU): per example
    # the three measurements follow each other, so a machine whose speed drifts over minutes (a shared host) biases
    # none of the ratios.
    server = AppServer(args.model, out / "app.log", dtype=dtype, head=args.head, threads=None,
                       env_extra={"NANOSPEC_REFRESH": args.refresh})
    browser = None
    try:
        client = Client(server.wait_ready(), verbose=False)
        browser = AppBrowser(server.url) if args.browser else None
        for label, prompt in examples:
            ids = session.encode(prompt)
            session.run("vanilla", ids, gen)  # warm: first-call costs out of the first figure
            cli = lane_rows({m: session.run(m, ids, gen, tree, vocab).summary for m in LANES})
            for snap in compare_runs(session, ids, gen, tree, vocab, methods=LANES):
                pass
            outside = lane_rows({t.method: t.summary() for t in snap.traces})
            shown = app_costs.corrected(prediction, app_costs.load(costs))  # what the app's status line forecasts
            runs = [through_app(client, prompt, values, out / "app.log") for _ in range(args.repeats)]
            best = max(runs, key=lambda r: r["lanes"][LANES[2]]["tokens_per_s"])
            results.append({"example": label, "cli": cli, "outside": outside, "app": best["lanes"],
                            "profile": {**(best["profile"] or {}), "client_s": best["client_s"]},
                            "model": {"plain_ms": prediction.plain_ms, "round_ms": prediction.round_ms},
                            "forecast": {"plain_ms": shown.plain_ms, "round_ms": shown.round_ms,
                                         "correction": shown.correction}})
            if browser is not None:
                results[-1]["browser"] = lane_table(browser.run(label))
                results[-1]["browser_cpu"] = browser.last_cpu
            print(f"[app-bench] {label}: done", flush=True)
    finally:
        if browser is not None:
            browser.close()
        server.stop()
    table = markdown(results, machine)
    (out / "app_bench.json").write_text(json.dumps({"machine": machine, "dtype": dtype, "tree": vars(tree),
                                                    "refresh": args.refresh, "results": results}, indent=1))
    (out / "app_bench.md").write_text(table)
    print(table)
    return 0

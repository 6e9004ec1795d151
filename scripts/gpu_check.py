"""The GPU check: runs as it is on a lent CUDA machine (python3, torch, transformers; no pip, no network, no vLLM) and,
with --quick --device cpu, at small shapes on a CPU (CI: tests/test_gpu_check.py), the same code either way.

    python3 scripts/gpu_check.py --out "$OUT"                  # the lent machine: under 5 minutes on one H100
    python3 scripts/gpu_check.py --quick --device cpu --out /tmp/check

Writes gpu_check.json and gpu_check.md under --out (default $OUT, else ./gpu_check_out) and prints a short table.
Sections (nanospec_core/bench/device_check): compat, greedy, sampling, reads, plugin_scoring, overlap, verify_cost,
draft_split, lm_head_graph, and plugin_engine (the plugin inside vLLM: only where vLLM's CUDA build is installed, not
on the lent machine); each passes, fails or skips on its own and the report says why. Exit status 1 when a section
failed. --set overrides integer shape fields (shapes.CheckShape), e.g. to try the full shapes briefly on a CPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from nanospec_core.bench.device_check import (compat, correctness, draft_cost, overlap, plugin_engine,  # noqa: E402
                                              plugin_scoring)
from nanospec_core.bench.device_check.report import Context, run_section, summary_table, write  # noqa: E402
from nanospec_core.bench.device_check.shapes import FULL, QUICK  # noqa: E402

SECTIONS = {
    "compat": compat.compat_section,
    "greedy": correctness.greedy_section,
    "sampling": correctness.sampling_section,
    "reads": correctness.reads_section,
    "plugin_scoring": plugin_scoring.plugin_scoring_section,
    "overlap": overlap.overlap_section,
    "verify_cost": draft_cost.verify_cost_section,  # then the two-vocabulary sections: one target build each way
    "draft_split": draft_cost.draft_split_section,
    "lm_head_graph": draft_cost.lm_head_graph_section,
    "plugin_engine": plugin_engine.plugin_engine_section,  # skipped where vLLM's CUDA build is absent (the lent one)
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="report folder ($OUT)")
    parser.add_argument("--quick", action="store_true", help="small shapes (a CPU in CI)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
    parser.add_argument("--set", default="", help="override integer shape fields, e.g. new_tokens=8,repeats=3")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    chosen = [name for name in (args.only.split(",") if args.only else SECTIONS) if name]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        print(f"gpu_check: unknown sections {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import transformers

    header = {"device_name": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor()})",
              "device": device, "mode": "quick" if args.quick else "full", "torch": torch.__version__,
              "cuda": torch.version.cuda, "transformers": transformers.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    shapes = QUICK if args.quick else FULL
    try:
        overrides = {key: int(value) for key, value in (item.split("=") for item in args.set.split(",") if item)}
        not_int = [key for key in overrides if not isinstance(getattr(shapes, key, None), int)]
        if not_int:
            raise ValueError(f"not integer shape fields: {not_int}")
        shapes = replace(shapes, **overrides)
    except (TypeError, ValueError) as error:
        print(f"gpu_check: --set {args.set!r}: {error}", file=sys.stderr)
        return 2
    header["shape overrides"] = args.set or "none"
    ctx = Context(device, args.quick, shapes, out_dir)
    start, results = time.perf_counter(), []
    for name in chosen:
        results.append(run_section(ctx, name, SECTIONS[name]))
        print(f"[gpu_check] {name}: {results[-1].status} ({results[-1].seconds} s)", flush=True)
        header["seconds"] = round(time.perf_counter() - start, 1)
        json_path, md_path = write(out_dir, header, results)  # after every section: a run cut short keeps its part
    print(summary_table(results))
    print(f"report: {json_path} and {md_path} ({header['seconds']} s)")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

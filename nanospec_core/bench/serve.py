"""serve-bench: the embedded target served by vLLM without speculation, with vLLM's own n-gram prompt lookup and
EAGLE-3, and with EAGLE-3 + NanoSpec (the plugin in vllm_plugin/), at batch 1, 8 or any other.

    python -m nanospec_core serve-bench --prompts 16 --max-new-tokens 128 --out bench_out/serve

vLLM lives in its own virtual environment (scripts/vllm_venv.sh; vLLM's CPU build pins another transformers), so this
command prepares the inputs here and starts one process per configuration there (`python -m nanospec_vllm.phase`):
  1. the target's HF-format folder (the project's model cache) and the head exported twice, in the public EAGLE-3
     layout (vLLM's own `LlamaForCausalLMEagle3`) and under the plugin's architecture with its static core;
  2. Spec-Bench first turns (round-robin over categories) as chat messages, templated by vLLM;
  3. per configuration one engine: a warm-up prompt, then the prompts one at a time (batch 1; --batch1-prompts
     takes the first n only), then in waves of b for each larger batch b, greedy (a finished configuration's
     results are kept: rerun to resume).
Reported per batch: tokens/s (and the ratio to no speculation), vLLM's acceptance length (1 + accepted / drafts: the
bonus token counts, as in the rest of the project), the plugin's active-set size and lm-head rows scored per step,
outputs equal to no speculation and, where one differs, the target's top-2 logit margin at the first difference
(from the plain run's logprobs: in bf16 a batched verify can round a near-tie the other way). Timings are from one
run on a shared machine: compare within it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..errors import NanoSpecError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ("plain", "ngram", "eagle3", "nanospec")  # ngram: vLLM's prompt lookup, the peer of our copy branches


def vllm_python(path: str | None) -> Path:
    python = Path(path or os.environ.get("NANOSPEC_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
    if not python.exists():
        raise NanoSpecError(f"no vLLM environment at {python}: build it with `bash scripts/vllm_venv.sh` "
                            "(or pass --vllm-python)")
    return python


def prepare(args, out: Path) -> tuple[str, dict[str, Path], list]:
    """Model folder, the two head exports, the chats."""
    from ..models.eagle_checkpoint import export_checkpoint
    from ..models.loading import resolve_model_dir
    from ..session import Session
    from .runner import load_questions

    session = Session(args.model, dtype="bfloat16", device="cpu", head=args.head)
    if session.head.kind != "eagle3":
        raise NanoSpecError(f"vLLM serves EAGLE-3 heads; --head {args.head} is {session.head.kind}")
    heads = {"eagle3": out / "heads" / "eagle3", "nanospec": out / "heads" / "nanospec"}
    export_checkpoint(session.head, heads["eagle3"])
    core = session.frequency[:args.static_core].tolist() if session.frequency is not None else []
    export_checkpoint(session.head, heads["nanospec"],
                      nanospec={"static_core": sorted(set(core) | set(session.stop_ids)), "capacity": args.capacity})
    questions = load_questions(args.questions, limit=args.prompts)[:args.prompts]
    chats = [[{"role": "user", "content": q.prompt}] for q in questions]
    return resolve_model_dir(args.model), heads, chats


def run_phase(python: Path, spec: dict, folder: Path, name: str, kv_cache_gib: int = 2) -> dict:
    sys.path.insert(0, str(REPO / "vllm_plugin"))
    from nanospec_vllm.phase import engine_env  # the same environment the plugin's tests use

    sys.path.pop(0)
    spec_path, result_path = folder / f"{name}.spec.json", folder / f"{name}.json"
    if result_path.exists():  # resume: a finished phase is kept
        return json.loads(result_path.read_text())
    spec_path.write_text(json.dumps(spec))
    # vLLM's CPU build otherwise reserves --gpu-memory-utilization (0.92) of the machine's RAM and stops at start-up
    # when less is free (a 24 GB machine with anything else running); VLLM_CPU_KVCACHE_SPACE sizes the KV cache.
    env = {**os.environ, **engine_env(kv_cache_gib=kv_cache_gib)}
    with (folder / f"{name}.log").open("w") as log:
        code = subprocess.call([str(python), "-m", "nanospec_vllm.phase", str(spec_path), str(result_path)],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise NanoSpecError(f"vLLM phase {name} failed (exit {code}); see {folder / (name + '.log')}")
    return json.loads(result_path.read_text())


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def summarise(results: dict[tuple[str, int], dict]) -> list[dict]:
    rows = []
    for (config, batch), result in results.items():
        plain = results[("plain", batch)]
        equal = [a == b for a, b in zip(result["outputs"], plain["outputs"])]
        diffs = [first_difference(a, b) for a, b in zip(result["outputs"], plain["outputs"])]
        # the target's top-2 margin where the output first left plain decoding (same context up to there)
        margins = [plain["margins"][k][d] for k, d in enumerate(diffs)
                   if d is not None and "margins" in plain and d < len(plain["margins"][k])]
        nano = (result.get("nanospec") or [{}])[0]
        rows.append({"config": config, "batch": batch, "prompts": len(result["outputs"]),
                     "tokens_per_s": result["tokens_per_s"],
                     "vs_plain": result["tokens_per_s"] / plain["tokens_per_s"],
                     "acceptance_length": result.get("spec", {}).get("acceptance_length"),
                     "avg_active": nano.get("avg_active"), "rows_scored": nano.get("avg_scored_rows"),
                     "full_rows": nano.get("full_rows"), "equal": f"{sum(equal)}/{len(equal)}",
                     "max_margin_at_diff": max(margins) if margins else None,
                     "first_diffs": [d for d in diffs if d is not None], "margins_at_diff": margins,
                     "new_tokens": result["new_tokens"],
                     "wall_s": result["wall_s"]})
    return rows


def run(args: argparse.Namespace) -> int:
    from .runner import markdown
    import pandas as pd

    python = vllm_python(args.vllm_python)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, heads, chats = prepare(args, out)
    batches = [int(b) for b in args.batches.split(",")]
    results, started = {}, time.time()
    for config in CONFIGS:  # one engine per configuration, measured at every batch size
        spec = {"model": model_dir, "draft": str(heads[config]) if config in heads else None,
                "method": "ngram" if config == "ngram" else None,
                "num_speculative_tokens": args.num_speculative_tokens, "dtype": "bfloat16", "max_model_len": 2048,
                "batches": batches, "batch1_prompts": args.batch1_prompts, "chats": chats,
                "max_tokens": args.max_new_tokens, "temperature": 0.0,
                "eager": args.eager, "warmup": 1, "logprobs": 2,  # every configuration pays the same for them
                "gpu_memory_utilization": args.gpu_memory_utilization}  # CUDA: the GPU's share (None: vLLM's)
        print(f"[{time.time() - started:6.0f} s] {config}", file=sys.stderr, flush=True)
        for batch, result in run_phase(python, spec, out, config, args.kv_cache_gib).items():
            results[(config, int(batch))] = result
    rows = summarise(results)
    table = pd.DataFrame(rows).drop(columns=["first_diffs", "margins_at_diff"])
    text = (f"# serve-bench: vLLM on the embedded target ({len(chats)} Spec-Bench prompts, {args.max_new_tokens} new "
            f"tokens, greedy, bf16, {args.num_speculative_tokens} draft tokens per round, "
            f"{'eager' if args.eager else 'compiled'})\n\n" + markdown(table.round(3)) + "\n")
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    print(text)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..paths import DEFAULT_QUESTIONS

    parser.add_argument("--model", default="embedded")
    parser.add_argument("--head", default="eagle3", help="an EAGLE-3 head: 'eagle3' (shipped), a folder or hub id")
    parser.add_argument("--questions", default=str(DEFAULT_QUESTIONS))
    parser.add_argument("--prompts", type=int, default=16, help="Spec-Bench prompts, round-robin over categories")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8", help="requests in flight per phase, comma-separated (b > 1: "
                        "the prompts in waves of b)")
    parser.add_argument("--batch1-prompts", type=int, default=None,
                        help="batch 1 decodes only the first n prompts (default all): one request at a time is slow")
    parser.add_argument("--num-speculative-tokens", type=int, default=3, help="vLLM's EAGLE draft chain length")
    parser.add_argument("--static-core", type=int, default=1024, help="most frequent ids in every request's set")
    parser.add_argument("--capacity", type=int, default=8192, help="a request's active-set bound")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (faster start, slower decode)")
    parser.add_argument("--kv-cache-gib", type=int, default=2,
                        help="vLLM's CPU KV cache in GiB (VLLM_CPU_KVCACHE_SPACE): a bound instead of 92%% of RAM")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="CUDA builds: the GPU memory share vLLM may reserve (default: vLLM's own, 0.92)")
    parser.add_argument("--vllm-python", default=None, help="the vLLM environment's python (default .venv-vllm)")
    parser.add_argument("--out", default="bench_out/serve")

"""The prepared GPU check (issues 13 and 24), on one CUDA GPU. Three parts, each reported as a markdown table:

  1. NanoSpec's own engine: EAGLE vs NanoSpec on a random-weight model of the embedded target's shape
     (Qwen2.5-Coder-0.5B: no packaged weights needed), bf16, greedy.
  2. The vLLM plugin's draft lm head, alone (torch + nanospec_vllm, no vLLM needed): per call, the full head vs the
     restricted one in its V1 form (eager, the buffer's union) and its V2 form (fixed capacity) captured in a CUDA
     graph and replayed, for 1 / 8 / 32 rows; the replay must equal the eager call, and must follow a membership
     change written after the capture (the graph reads the buffers in place).
  3. The plugin inside vLLM (needs the CUDA build of vLLM 0.32: `--vllm-python`, $NANOSPEC_VLLM_PYTHON, or this
     python when it imports vllm): a tiny random target and EAGLE-3 head, no speculation vs vLLM's EAGLE-3 vs the
     plugin, with vLLM's defaults (Model Runner V2, async scheduling, CUDA graphs), then the plugin on V1
     (VLLM_USE_V2_MODEL_RUNNER=0). Checked: the runner in use, the restriction applied on every draft step, greedy
     output equal to no speculation (float32); reported: tokens/s, acceptance, active-set and rows-scored figures.

    bash scripts/gpu_check.sh                          # everything; writes $OUT/gpu_check.md when OUT is set
    python scripts/gpu_check.py --plugin-only [--vllm-python PATH]
Random weights accept few drafts, so the figures that mean something are the draft time split and the
NanoSpec / EAGLE draft-time ratio, not tokens per round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "vllm_plugin"))

EMBEDDED_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1000000.0, tie_word_embeddings=True)


def core_check(lines: list[str]) -> None:
    import transformers

    from nanospec_core.config import GenerationConfig, TreeConfig, VocabConfig
    from nanospec_core.decoding.engine import speculative_decode
    from nanospec_core.decoding.request import Request
    from nanospec_core.metrics import summarize
    from nanospec_core.models.eagle import random_head
    from nanospec_core.models.target import TargetModel
    from nanospec_core.vocab.policies import make_policy

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**EMBEDDED_SHAPE)).to("cuda", torch.bfloat16)
    target = TargetModel(model.eval().requires_grad_(False))
    head = random_head(target, "eagle2", seed=0)
    prompt = torch.randint(100, 150000, (200,), device="cuda")
    gen = GenerationConfig(max_new_tokens=128, stop_on_eos=False)
    tree = TreeConfig(depth=6, top_k=10, total_tokens=60)  # the GPU preset
    lines += [f"# GPU check: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
              f"random Qwen2.5-0.5B shape, bf16, tree {tree.depth}/{tree.top_k}/{tree.total_tokens}", "",
              "| method | tok/s | tau | draft ms/round | lm head ms | backbone ms | gather ms | verify ms | active |",
              "|---|---|---|---|---|---|---|---|---|"]
    outputs = {}
    for method, policy_name in (("eagle", "full"), ("nanospec", "nanospec"), ("eagle", "full"),
                                ("nanospec", "nanospec")):  # each twice: the first run warms the kernels up
        policy = make_policy(policy_name, head.lm_head_weight, VocabConfig(), target.vocab_size,
                             frequency=torch.randperm(target.vocab_size, device="cuda"))
        torch.cuda.synchronize()
        start = time.perf_counter()
        steps = list(speculative_decode(target, head, policy, Request(prompt, gen, frozenset()), tree))
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        outputs.setdefault(method, []).append([t for s in steps for t in s.tokens])
        s = summarize(steps, wall)
        rounds = [x for x in steps if x.round > 0]
        mean = lambda key: sum(getattr(x, key) for x in rounds) / max(len(rounds), 1)  # noqa: E731
        row = (f"| {method} | {s.tokens_per_s:.1f} | {s.mean_accepted:.2f} | {mean('draft_ms'):.2f} | "
               f"{mean('lm_head_ms'):.2f} | {mean('backbone_ms'):.2f} | {mean('gather_ms'):.2f} | "
               f"{mean('verify_ms'):.2f} | {mean('active_vocab'):.0f} |")
        if len(outputs[method]) == 2:
            lines.append(row)
    same = outputs["eagle"][1] == outputs["nanospec"][1]
    lines += ["", f"greedy outputs identical (EAGLE vs NanoSpec, bf16): {same}"]


def cuda_ms(fn, repeats: int = 50) -> float:
    """Median milliseconds of fn() by CUDA events (warmed up first)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def plugin_profile(lines: list[str]) -> None:
    """Part 2: the draft lm head per call at the embedded vocabulary (151,936 x 896, bf16)."""
    from nanospec_vllm.active_vocab import ActiveVocab

    vocab_size, hidden_size, capacity = 151936, 896, 32768
    weight = torch.randn(vocab_size, hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02
    lines += ["", "## The plugin's draft lm head, per call (bf16, V = 151,936, 1,500 ids per request)", "",
              "| rows | full head ms | V1 union ms | V2 fixed (C = 32,768) ms, CUDA graph replay | union rows | "
              "replay = eager | replay follows new members |", "|---|---|---|---|---|---|---|"]
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 8, 32):
        hidden = torch.randn(rows, hidden_size, device="cuda", dtype=torch.bfloat16)
        requests = [f"r{k}" for k in range(rows)]
        eager = ActiveVocab(weight, vocab_size, slots=rows + 1, core_ids=range(1000), buffer_capacity=capacity)
        fixed = ActiveVocab(weight, vocab_size, slots=rows + 1, core_ids=range(1000), buffer_capacity=capacity,
                            fixed=True)
        for k, request in enumerate(requests):
            ids = torch.randint(0, vocab_size, (500,), generator=generator).tolist()
            eager.admit(request, ids)
            fixed.admit(request, ids, slot=k)
        eager.flush()
        fixed.flush()
        slots = torch.arange(rows, device="cuda")
        full_ms = cuda_ms(lambda: hidden @ weight.T)
        union_ms = cuda_ms(lambda: eager.logits(hidden, requests, lambda h: h @ weight.T))
        want = fixed.graph_logits(hidden, slots)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fixed.graph_logits(hidden, slots)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fixed.graph_logits(hidden, slots)
        graph.replay()
        torch.cuda.synchronize()
        same = bool(torch.equal(torch.isfinite(out), torch.isfinite(want)) and
                    torch.allclose(out[torch.isfinite(out)], want[torch.isfinite(want)]))
        fixed.absorb(requests[0], [vocab_size - 1])  # written after the capture, through the flush
        fixed.flush()
        graph.replay()
        torch.cuda.synchronize()
        follows = bool(torch.isfinite(out[0, vocab_size - 1]))
        fixed_ms = cuda_ms(graph.replay)
        lines.append(f"| {rows} | {full_ms:.3f} | {union_ms:.3f} | {fixed_ms:.3f} | {eager.used} | {same} | "
                     f"{follows} |")


def vllm_python(path: str | None) -> str | None:
    for candidate in (path, os.environ.get("NANOSPEC_VLLM_PYTHON"), sys.executable):
        if candidate and subprocess.run([candidate, "-c", "import vllm, torch; assert torch.cuda.is_available()"],
                                        capture_output=True).returncode == 0:
            return candidate
    return None


def plugin_engine(lines: list[str], python: str | None) -> None:
    """Part 3: the plugin inside vLLM's CUDA build, one engine per process (nanospec_vllm.phase)."""
    lines += ["", "## The plugin inside vLLM (tiny random target, float32, greedy, 8 prompts x 64 tokens)", ""]
    if python is None:
        lines.append("vLLM's CUDA build is not installed here (`--vllm-python`): the engine checks did not run.")
        return
    sys.path.insert(0, str(REPO / "vllm_plugin" / "tests"))
    from tiny_models import build_target, export_head

    root = Path(tempfile.mkdtemp(prefix="nanospec-gpu-"))
    target = build_target(root / "target")
    export_head(target, root / "eagle3", None, own_lm_head=False, tied_lm_head=True)
    export_head(target, root / "nanospec", {"static_core": list(range(64))}, own_lm_head=False, tied_lm_head=True)
    prompts = [torch.randint(100 + 400 * k, 500 + 400 * k, (32,)).tolist() for k in range(8)]
    configs = [("plain", None, {}), ("eagle3", "eagle3", {}), ("nanospec (V2)", "nanospec", {}),
               ("nanospec (V1)", "nanospec", {"VLLM_USE_V2_MODEL_RUNNER": "0"})]
    lines += ["| config | runner | restricted every step | equal to plain | tok/s b1 | tok/s b8 | acceptance b8 | "
              "avg active | rows scored per call |", "|---|---|---|---|---|---|---|---|---|"]
    results = {}
    for name, draft, env in configs:
        spec = {"model": str(root / "target"), "draft": draft and str(root / draft), "dtype": "float32",
                "max_model_len": 512, "batches": [1, 8], "prompts": prompts, "max_tokens": 64, "ignore_eos": True,
                "eager": False, "num_speculative_tokens": 3, "warmup": 1}
        spec_path, out = root / f"{draft or 'plain'}-{len(results)}.json", root / f"out-{len(results)}.json"
        spec_path.write_text(json.dumps(spec))
        run = subprocess.run([python, "-m", "nanospec_vllm.phase", str(spec_path), str(out)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO / "vllm_plugin"), **env},
                             capture_output=True, text=True, timeout=400)
        if run.returncode != 0:
            lines.append(f"| {name} | failed: {run.stderr.strip().splitlines()[-1][:150]} | | | | | | | |")
            continue
        results[name] = result = json.loads(out.read_text())
        stats = (result["8"].get("nanospec") or [{}])[0]
        equal = result["8"]["outputs"] == results["plain"]["8"]["outputs"] if "plain" in results else "-"
        acceptance = result["8"].get("spec", {}).get("acceptance_length")
        lines.append(f"| {name} | {stats.get('runner', '-')} | {stats.get('restricted_every_step', '-')} | {equal} | "
                     f"{result['1']['tokens_per_s']:.1f} | {result['8']['tokens_per_s']:.1f} | "
                     f"{acceptance if acceptance is None else round(acceptance, 2)} | "
                     f"{stats.get('avg_active', 0):.0f} | {stats.get('avg_scored_rows', 0):.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugin-only", action="store_true", help="parts 2 and 3 only")
    parser.add_argument("--vllm-python", default=None, help="a python with vLLM's CUDA build (part 3)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    lines: list[str] = []
    for part in ([] if args.plugin_only else [core_check]) + [plugin_profile]:
        try:
            part(lines)
        except Exception as error:  # noqa: BLE001 - one part failing must not hide the others' figures
            lines.append(f"\n{part.__name__} failed: {type(error).__name__}: {error}")
    try:
        plugin_engine(lines, vllm_python(args.vllm_python))
    except Exception as error:  # noqa: BLE001
        lines.append(f"\nplugin_engine failed: {type(error).__name__}: {error}")
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The plugin inside vLLM, where vLLM's CUDA build is installed (not on the lent machine: its wheel is 326 MB and pins
another torch, so it cannot travel with the repository). A tiny random target and EAGLE-3 head: no speculation vs
vLLM's EAGLE-3 vs the plugin, with vLLM's defaults (Model Runner V2, async scheduling, CUDA graphs), then the plugin
on V1 (VLLM_USE_V2_MODEL_RUNNER=0), one engine per process (nanospec_vllm.phase). Checked: the runner in use, the
restriction applied on every draft step, greedy output equal to no speculation (float32)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ...paths import REPO
from .report import Context, Skip


def vllm_python(ctx: Context) -> str:
    for candidate in (os.environ.get("NANOSPEC_VLLM_PYTHON"), sys.executable):
        if candidate and subprocess.run([candidate, "-c", "import vllm, torch; assert torch.cuda.is_available()"],
                                        capture_output=True, timeout=300).returncode == 0:
            return candidate
    raise Skip("vLLM's CUDA build is not installed here (set NANOSPEC_VLLM_PYTHON to a python that has it)")


def plugin_engine_section(ctx: Context) -> None:
    if not ctx.cuda:
        raise Skip("the plugin inside vLLM: a CUDA build of vLLM on a GPU only")
    python = vllm_python(ctx)
    sys.path.insert(0, str(REPO / "vllm_plugin" / "tests"))
    from tiny_models import build_target, export_head

    root = Path(tempfile.mkdtemp(prefix="nanospec-gpu-"))
    target = build_target(root / "target")
    export_head(target, root / "eagle3", None, own_lm_head=False, tied_lm_head=True)
    export_head(target, root / "nanospec", {"static_core": list(range(64))}, own_lm_head=False, tied_lm_head=True)
    prompts = [torch.randint(100 + 400 * k, 500 + 400 * k, (32,)).tolist() for k in range(8)]
    configs = [("plain", None, {}), ("eagle3", "eagle3", {}), ("nanospec (V2)", "nanospec", {}),
               ("nanospec (V1)", "nanospec", {"VLLM_USE_V2_MODEL_RUNNER": "0"})]
    rows, results = [], {}
    for name, draft, env in configs:
        spec = {"model": str(root / "target"), "draft": draft and str(root / draft), "dtype": "float32",
                "max_model_len": 512, "batches": [1, 8], "prompts": prompts, "max_tokens": 64, "ignore_eos": True,
                "eager": False, "num_speculative_tokens": 3, "warmup": 1}
        spec_path, out = root / f"spec-{len(results)}.json", root / f"out-{len(results)}.json"
        spec_path.write_text(json.dumps(spec))
        run = subprocess.run([python, "-m", "nanospec_vllm.phase", str(spec_path), str(out)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO / "vllm_plugin"), **env},
                             capture_output=True, text=True, timeout=400)
        if not ctx.check(f"{name}: the engine ran", run.returncode == 0, run.stderr.strip()[-300:]):
            continue
        results[name] = result = json.loads(out.read_text())
        stats = (result["8"].get("nanospec") or [{}])[0]
        equal = result["8"]["outputs"] == results["plain"]["8"]["outputs"] if "plain" in results else None
        if draft is not None and equal is not None:
            ctx.check(f"{name}: greedy output equals no speculation", equal)
        if draft == "nanospec":
            ctx.check(f"{name}: restricted on every draft step", bool(stats.get("restricted_every_step")),
                      str(stats.get("runner")))
        rows.append({"config": name, "runner": stats.get("runner", "-"), "tok/s b1": result["1"]["tokens_per_s"],
                     "tok/s b8": result["8"]["tokens_per_s"], "avg active": stats.get("avg_active", 0),
                     "rows scored per call": stats.get("avg_scored_rows", 0)})
    ctx.figure("engines", rows)

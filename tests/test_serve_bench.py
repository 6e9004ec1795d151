"""serve-bench's report (nanospec_core/bench/serve.py), from phase results as nanospec_vllm.phase writes them."""
import sys
from pathlib import Path

import pytest

from nanospec_core.bench.serve import first_difference, summarise, vllm_python
from nanospec_core.errors import NanoSpecError


def phase(outputs, tokens_per_s, accepted=None, margins=None, active=None):
    result = {"outputs": outputs, "tokens_per_s": tokens_per_s, "new_tokens": sum(map(len, outputs)), "wall_s": 1.0}
    if accepted is not None:
        result["spec"] = {"acceptance_length": accepted}
    if margins is not None:
        result["margins"] = margins
    if active is not None:
        result["nanospec"] = [{"avg_active": active, "avg_scored_rows": active + 10, "full_rows": 0}]
    return result


def test_summary_ratios_equality_and_the_margin_where_an_output_first_differs():
    plain = phase([[1, 2, 3], [4, 5, 6]], 10.0, margins=[[2.0, 0.125, 1.0], [3.0, 3.0, 3.0]])
    results = {("plain", 1): plain,
               ("eagle3", 1): phase([[1, 2, 3], [4, 5, 6]], 9.0, accepted=1.5),
               ("nanospec", 1): phase([[1, 7, 3], [4, 5, 6]], 12.0, accepted=1.5, active=1000.0)}
    rows = {row["config"]: row for row in summarise(results)}
    assert rows["nanospec"]["vs_plain"] == pytest.approx(1.2) and rows["eagle3"]["vs_plain"] == pytest.approx(0.9)
    assert rows["eagle3"]["equal"] == "2/2" and rows["nanospec"]["equal"] == "1/2"
    assert rows["nanospec"]["first_diffs"] == [1] and rows["nanospec"]["margins_at_diff"] == [0.125]
    assert rows["nanospec"]["avg_active"] == 1000.0 and rows["eagle3"]["avg_active"] is None


def test_first_difference_counts_a_shorter_output():
    assert first_difference([1, 2], [1, 2]) is None
    assert first_difference([1, 2], [1, 2, 3]) == 2 and first_difference([1, 3], [1, 2]) == 1


def test_a_missing_vllm_environment_is_a_clear_error(tmp_path):
    with pytest.raises(NanoSpecError, match="scripts/vllm_venv.sh"):
        vllm_python(str(tmp_path / "nope" / "python"))


def test_a_phase_decodes_batch_1_on_the_first_prompts_and_larger_batches_in_waves(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "vllm_plugin"))
    from nanospec_vllm.phase import measure

    calls = []

    def decode(batch):  # vLLM's generate: one output per prompt, in order
        calls.append([k for k, _ in batch])
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[k, k], logprobs=None)]) for k, _ in batch]

    inputs = [(k, f"prompt {k}") for k in range(10)]
    one = measure(None, decode, inputs, 1, speculative=False, batch1_prompts=3)
    assert calls == [[0], [1], [2]] and one["outputs"] == [[0, 0], [1, 1], [2, 2]] and one["new_tokens"] == 6
    calls.clear()
    four = measure(None, decode, inputs, 4, speculative=False, batch1_prompts=3)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and four["outputs"] == [[k, k] for k in range(10)]


def readme_vllm_lines() -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## NanoSpec in vLLM"):]
    block = section[section.index("```bash"):section.index("```", section.index("```bash") + 3)]
    return [line for line in block.splitlines() if "vllm" in line and not line.lstrip().startswith("#")]


def test_the_readmes_vllm_lines_bound_their_memory():
    """vLLM's CPU build reserves 92% of RAM unless told otherwise: every engine the README starts on the CPU sizes
    its KV cache, and the CUDA server line says the GPU share it may take."""
    lines = readme_vllm_lines()
    cpu = [line for line in lines if "LLM(" in line or "vllm.entrypoints.openai.api_server" in line]
    cuda = [line for line in lines if line.startswith("vllm serve ")]
    assert len(cpu) == 2 and all(line.startswith("VLLM_CPU_KVCACHE_SPACE=2 ") for line in cpu)
    assert len(cuda) == 1 and "--gpu-memory-utilization 0.5" in cuda[0]


def test_serve_bench_bounds_the_cpu_kv_cache_and_passes_the_gpu_share(tmp_path, monkeypatch):
    import argparse
    import json as json_module

    from nanospec_core.bench import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--kv-cache-gib", "3", "--gpu-memory-utilization", "0.4"])
    assert args.kv_cache_gib == 3 and args.gpu_memory_utilization == 0.4
    assert parser.parse_args([]).kv_cache_gib == 2 and parser.parse_args([]).gpu_memory_utilization is None
    seen = {}

    def call(command, cwd, env, stdout, stderr):
        seen["env"] = env
        Path(command[-1]).write_text(json_module.dumps({"1": {}}))
        return 0

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(serve.subprocess, "call", call)
    serve.run_phase(Path(sys.executable), {"model": "m"}, tmp_path, "plain", kv_cache_gib=3)
    assert seen["env"]["VLLM_CPU_KVCACHE_SPACE"] == "3"

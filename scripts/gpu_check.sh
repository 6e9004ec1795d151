#!/usr/bin/env bash
# The prepared GPU check (under 10 minutes on one GPU): install, the CUDA tests, then NanoSpec's engine timing, the
# vLLM plugin's draft lm head (eager and CUDA-graph forms) and, where vLLM's CUDA build is installed (NANOSPEC_VLLM_PYTHON,
# or this python), the plugin inside vLLM: the runner in use, the restriction on every draft step, greedy equality.
# Output: stdout, and $OUT/gpu_check.md + $OUT/cuda_tests.txt (+ $OUT/plugin_tests.txt) when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -c "import torch, transformers" 2>/dev/null || python -m pip install -q torch transformers safetensors pytest hypothesis
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
python -m pytest -q tests/test_cuda.py tests/test_engine.py tests/test_host_reads.py 2>&1 | tee "${OUT:-/tmp}/cuda_tests.txt" | tail -5
# the plugin's CPU-runnable suites (V2 hooks with fakes, graph-safe scoring): they must pass on the GPU machine too
python -m pytest -q tests/test_vllm_active_vocab.py tests/test_vllm_graph_scoring.py tests/test_vllm_committed_ids.py \
  2>&1 | tee "${OUT:-/tmp}/plugin_tests.txt" | tail -3
vllm_python=${NANOSPEC_VLLM_PYTHON:-python}
if "$vllm_python" -c "import vllm" 2>/dev/null; then
  PYTHONPATH=vllm_plugin "$vllm_python" -m pytest -q vllm_plugin/tests/test_v1_hooks.py vllm_plugin/tests/test_v2_hooks.py \
    2>&1 | tee -a "${OUT:-/tmp}/plugin_tests.txt" | tail -3
fi
python scripts/gpu_check.py --vllm-python "$vllm_python"

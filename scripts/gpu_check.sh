#!/usr/bin/env bash
# The prepared GPU check (under 5 minutes on one GPU): install, the CUDA tests, then a short EAGLE vs NanoSpec timing.
# Output: stdout, and $OUT/gpu_check.md + $OUT/cuda_tests.txt when OUT is set (the device tool's folder).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -c "import torch, transformers" 2>/dev/null || python -m pip install -q torch transformers safetensors pytest hypothesis
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
python -m pytest -q tests/test_cuda.py tests/test_engine.py tests/test_host_reads.py 2>&1 | tee "${OUT:-/tmp}/cuda_tests.txt" | tail -5
python scripts/gpu_check.py

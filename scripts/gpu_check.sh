#!/usr/bin/env bash
# The GPU check on a lent machine as it is (python3 with torch, transformers, pytest; no pip, no network, no vLLM):
#   bash scripts/gpu_check.sh     ->  $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/cuda_tests.txt   (under 5 minutes)
# scripts/gpu_check.py is the check (its sections, README "The GPU check"); the CUDA-only tests follow, bounded so the
# whole stays under 5 minutes even when a part hangs.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-gpu_check_out}
mkdir -p "$out"
timeout 230 python3 scripts/gpu_check.py --out "$out"
status=$?
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.txt" | tail -3
exit $status

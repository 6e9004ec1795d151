#!/usr/bin/env bash
# The target answers a stage's prompts in vLLM, and the answers are packed into the committed corpus as they come:
#   bash scripts/head_answers.sh PROMPTS ANSWERS MINUTES [--commit]
# vLLM appends every finished chunk to ANSWERS; every 10 minutes (and at the end) the new answers become one shard in
# data/head/<model>/shards, committed to git with --commit, so a session cut short loses at most one chunk.
set -euo pipefail
cd "$(dirname "$0")/.."
prompts=$1 answers=$2 minutes=$3 commit=${4:-}
model=$(python -c "from nanospec_core.models.loading import resolve_model_dir; print(resolve_model_dir('embedded'))")
pack() {
  python -m nanospec_core head-data pack --answers "$answers" --min-items "${1:-64}"
  if [ "$commit" = "--commit" ] && [ -n "$(git status --porcelain data/head)" ]; then
    git add data/head && git commit -q -m "Head data: $(git status --porcelain data/head | grep -c 'answers_.*jsonl') new shard(s) of the target's answers" -- data/head
  fi
}
.venv-vllm/bin/python -m nanospec_vllm answers --model "$model" --prompts "$prompts" --out "$answers" \
  --minutes "$minutes" --chunk 256 --in-flight 128 &
engine=$!
while kill -0 "$engine" 2>/dev/null; do
  sleep 600
  pack 64 || true
done
wait "$engine"
pack 1

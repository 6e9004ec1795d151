#!/usr/bin/env bash
# The lent GPU machine's library versions, on this CPU: bash scripts/compat_venv.sh [FOLDER]   (default .venv-compat)
# A venv over the system's packages (torch stays the system's CPU wheel) with transformers pinned to the lent machine's
# 5.17, so CI runs `gpu_check.py --quick --device cpu` under it before any machine is lent (tests/test_gpu_check.py).
# Quick when it is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-compat}
want=${NANOSPEC_COMPAT_TRANSFORMERS:-5.17}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv"
if ! "$venv/bin/python" -c "import transformers, sys; sys.exit(not transformers.__version__.startswith('$want.'))" \
    2>/dev/null; then
  "$venv/bin/pip" install -q "transformers==$want.*"
fi
"$venv/bin/python" -c "import torch, transformers; print('compat venv $venv: torch', torch.__version__,
'transformers', transformers.__version__)"

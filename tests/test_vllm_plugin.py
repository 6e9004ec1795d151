"""The vLLM plugin's own suite (vllm_plugin/tests), run in the vLLM virtual environment that scripts/vllm_venv.sh
builds (.venv-vllm, or $NANOSPEC_VLLM_PYTHON): both model runners' hooks with fakes of vLLM's runner and speculator
(V2's CUDA-graph path without a GPU), real engines on a tiny random model (Model Runner V1 on the CPU build), and
`vllm serve` queried over HTTP. Outside CI a missing environment skips it; in CI (.ci/run builds it) a missing
environment fails."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = Path(os.environ.get("NANOSPEC_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))


def test_vllm_plugin_suite_passes_in_its_own_environment():
    if not PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"no vLLM environment at {PYTHON}: .ci/run builds it with scripts/vllm_venv.sh")
        pytest.skip(f"no vLLM environment at {PYTHON} (bash scripts/vllm_venv.sh builds it)")
    run = subprocess.run([str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "vllm_plugin/tests"],
                         cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-2000:]


def test_the_version_check_names_both_versions_and_accepts_a_local_build():
    """Defect 6 (issue 35), without vLLM: the comparison hooks.check() logs at start-up."""
    import sys

    sys.path.insert(0, str(REPO / "vllm_plugin"))
    from nanospec_vllm.hooks import WRITTEN_FOR, version_warning

    line = version_warning("0.33.1")
    assert line and "0.33.1" in line and WRITTEN_FOR in line
    assert version_warning(WRITTEN_FOR) is None and version_warning(WRITTEN_FOR + "+cpu") is None

"""The GPU check (scripts/gpu_check.py) cannot rot: CI runs it in quick CPU mode, with the system's transformers and
under the lent machine's transformers 5.17 (.venv-compat, scripts/compat_venv.sh), and its report machinery and
timeline reading are checked here on made-up inputs (the CUDA timeline itself only exists on a GPU)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanospec_core.bench.device_check.overlap import stream_overlap
from nanospec_core.bench.device_check.report import Context, Skip, run_section

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"
COMPAT_PYTHON = Path(os.environ.get("NANOSPEC_COMPAT_PYTHON", REPO / ".venv-compat" / "bin" / "python"))
MUST_PASS = ("compat", "greedy", "sampling", "reads", "plugin_scoring", "draft_split", "lm_head_graph", "verify_cost")
# The lent machine has torch, transformers (and what they pull), pytest and hypothesis: the check runs with the
# project's other dependencies made unimportable (a probe still finds them, as transformers' probes expect).
ABSENT = ("gradio", "vllm", "matplotlib", "pandas", "plotly", "playwright", "gguf")
AS_ON_THE_LENT_MACHINE = """
import importlib.machinery, runpy, sys
ABSENT = {absent!r}
class Unimportable:
    def create_module(self, spec):
        raise ImportError(spec.name + " is not on the lent GPU machine")
    def exec_module(self, module):
        raise ImportError(module.__name__)
class Absent:
    def find_spec(self, name, path=None, target=None):
        if any(name == a or name.startswith(a + ".") for a in ABSENT):
            return importlib.machinery.ModuleSpec(name, Unimportable())
sys.meta_path.insert(0, Absent())
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_quick(python: str, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = AS_ON_THE_LENT_MACHINE.format(absent=ABSENT, script=str(SCRIPT))
    run = subprocess.run([python, "-c", code, "--quick", "--device", "cpu", "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "section" in run.stdout and "report:" in run.stdout  # the short table
    assert (out / "gpu_check.md").read_text().startswith("# NanoSpec GPU check")
    return json.loads((out / "gpu_check.json").read_text())


def check_report(report: dict) -> None:
    sections = report["sections"]
    assert list(sections) == list(load_script().SECTIONS)
    for name in MUST_PASS:
        assert sections[name]["status"] == "passed", (name, sections[name]["reason"])
    assert sections["overlap"]["status"] == "skipped" and "CUDA only" in sections["overlap"]["reason"]
    assert sections["plugin_engine"]["status"] == "skipped" and "vLLM" in sections["plugin_engine"]["reason"]
    assert all(check["ok"] for check in sections["greedy"]["checks"].values()) and sections["greedy"]["checks"]
    assert report["passed"] and report["header"]["mode"] == "quick"


def test_the_quick_cpu_check_runs_every_section_and_correctness_passes(tmp_path):
    check_report(run_quick(sys.executable, tmp_path))


def test_the_quick_check_passes_under_the_lent_machines_transformers(tmp_path):
    if not COMPAT_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"no compat environment at {COMPAT_PYTHON}: .ci/run builds it with scripts/compat_venv.sh")
        pytest.skip(f"no compat environment at {COMPAT_PYTHON} (bash scripts/compat_venv.sh builds it)")
    report = run_quick(str(COMPAT_PYTHON), tmp_path)
    assert report["header"]["transformers"].startswith("5.17."), report["header"]
    check_report(report)


def test_a_failing_or_skipped_section_does_not_stop_the_others(tmp_path):
    ctx = Context("cpu", True, None, tmp_path)

    def broken(ctx):
        ctx.check("fine", True)
        raise RuntimeError("boom")

    def wrong(ctx):
        ctx.check("holds", False, "it did not")

    def absent(ctx):
        raise Skip("CUDA only")

    results = [run_section(ctx, name, fn) for name, fn in (("a", broken), ("b", wrong), ("c", absent),
                                                           ("d", lambda ctx: ctx.figure("x", 1.0)))]
    assert [r.status for r in results] == ["failed", "failed", "skipped", "passed"]
    assert "RuntimeError: boom" in results[0].reason and "holds" in results[1].reason
    assert results[2].reason == "CUDA only" and results[3].figures == {"x": 1.0}


def kernel(stream, ts, dur):
    return {"cat": "kernel", "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_the_timeline_reader_finds_a_gather_that_overlaps_the_backbone():
    backbone = [kernel(7, 100 + 20 * k, 15) for k in range(6)]  # main stream: 100 .. 215 us
    overlapping = stream_overlap({"traceEvents": backbone + [kernel(13, 110, 30)]})
    assert overlapping["streams"] == 2 and overlapping["side_kernels"] == 1 and overlapping["in_window"] == 1
    assert overlapping["overlap_us"] == pytest.approx(5 + 15)  # 110-140 against kernels at 100-115 and 120-135
    after = stream_overlap({"traceEvents": backbone + [kernel(13, 300, 30)]})  # serialised after the backbone
    assert after["in_window"] == 0 and after["overlap_us"] == 0
    one_stream = stream_overlap({"traceEvents": backbone + [{"cat": "cpu_op", "ts": 0, "dur": 1}]})
    assert one_stream["streams"] == 1 and one_stream["side_kernels"] == 0


def test_asking_for_cuda_without_a_device_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    assert load_script().main(["--device", "cuda", "--out", "/tmp/unused-gpu-check"]) == 2
    assert "no CUDA device" in capsys.readouterr().err

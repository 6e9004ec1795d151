"""Publish the app as a Hugging Face Space: the exact folder app.py needs, uploaded with huggingface_hub.

    python -m nanospec_core space --repo USER/NAME --dry-run --out space_out   # build and list; upload nothing
    python -m nanospec_core space --repo USER/NAME                             # build, then upload (a token)
    python -m nanospec_core space --repo USER/NAME --hardware zero-gpu         # the ZeroGPU variant

What goes in: app.py; the nanospec_core modules that app.py imports, directly or through others (read from the
import statements, lazy ones inside functions included); assets/ (the shipped heads, the frequency table, the css,
Spec-Bench's questions for the Benchmark tab); and two files written here for the chosen hardware:
requirements.txt and README.md, whose front matter is the Space's configuration. Nothing else: no tests, no
head-training corpus (data/), no vLLM plugin, no CI, no scripts.

The upload is one commit through HfApi.upload_folder: no git and no history travel (a git push of this repository
would carry every earlier head in its history), and the Hub stores binary and large files with Xet on its side.
delete_patterns="*" removes what an earlier upload left that this folder no longer holds (the Hub keeps its
.gitattributes). `--dry-run` lists every file with its size and how the Hub will store it: its preupload step
decides from each file's size and first 512 bytes, and `storage()` applies the same rule (over 10 MiB, or not
text, goes to Xet).
"""
from __future__ import annotations

import argparse
import ast
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NanoSpecError
from .paths import ASSETS, REPO

APP_FILE = "app.py"
MARK = "# Written by `python -m nanospec_core space`"  # heads the Space's requirements.txt: a folder it may replace
PACKAGE = "nanospec_core"
XET_ABOVE_BYTES = 10 * 1024 * 1024  # the Hub keeps larger files out of plain git whatever their content
DRY_RUN_OUT = Path("space_out")  # --dry-run's folder when --out is not given (git ignores it)
SAMPLE_BYTES = 512  # what huggingface_hub sends the Hub to decide text or binary
CPU_WHEELS = "https://download.pytorch.org/whl/cpu"  # torch's CPU builds; PyPI's linux torch is the CUDA one
SPACE_BODY = """# NanoSpec

EAGLE-3 speculative decoding whose draft head scores only the token ids of this context: three lanes on the same
machine, one round each in turn (the target alone, plain EAGLE, EAGLE + NanoSpec), the round view of the draft
trees, the temporal-locality view and a small Spec-Bench run. Lossless: the target verifies every token.

This Space was built by `python -m nanospec_core space` from the NanoSpec repository, whose README holds the
method, the command line, the results and the tests. Spec-Bench's questions (`assets/spec_bench/`, Apache-2.0)
serve the Benchmark tab only.
"""


@dataclass(frozen=True)
class Hardware:
    """A Space variant: what the Hub runs it on and the requirements that install there."""

    flavor: str  # the Hub's hardware name (create_repo's space_hardware, the front matter's suggested_hardware)
    python_version: str  # the front matter's python_version: the interpreter the Space gets
    pins: dict[str, str] = field(default_factory=dict)  # versions that differ from requirements.txt here
    extra_index: str | None = None  # a pip --extra-index-url line at the top of the Space's requirements.txt
    extra: tuple[str, ...] = ()  # requirements only this variant needs
    why: str = ""  # the reason for the pins, written as a comment into the Space's requirements.txt
    suggested: str | None = None  # the front matter's suggested_hardware (None: left out)


HARDWARE = {
    # CPU Basic: the CPU wheel of torch (PyPI's is the multi-GB CUDA build), the repository's own versions.
    "cpu-basic": Hardware("cpu-basic", "3.11", {"torch": "2.13.0+cpu"}, extra_index=CPU_WHEELS,
                          why="torch's CPU build from download.pytorch.org: PyPI's linux torch is the CUDA build",
                          suggested="cpu-basic"),
    # ZeroGPU: the Hub's ZeroGPU page lists Python 3.10.13 and torch 2.1.0-2.8.0 (the CUDA build from PyPI);
    # transformers 5.23 and pandas 3 need Python 3.11, so their last releases for 3.10. `spaces` is ZeroGPU's
    # package (app.py imports it before torch and sizes every @spaces.GPU call from its request). The Spaces
    # configuration reference lists no ZeroGPU value for suggested_hardware: the card leaves it out.
    "zero-gpu": Hardware("zero-a10g", "3.10.13", {"torch": "2.8.0", "transformers": "5.20.2", "pandas": "2.3.3"},
                         extra=("spaces",),
                         why="ZeroGPU: Python 3.10.13 and a torch it lists (2.8.0); the last transformers and "
                             "pandas releases for Python 3.10"),
}


# ---------------------------------------------------------------------------------------------------------
# Which files

def module_file(name: str, root: Path) -> Path | None:
    """nanospec_core.a.b -> root/nanospec_core/a/b.py or .../b/__init__.py; None when it is no module (a name)."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path, root: Path) -> set[str]:
    """The nanospec_core modules a file imports anywhere in its body (relative imports resolved)."""
    relative = path.relative_to(root).with_suffix("").parts
    package = list(relative if path.name == "__init__.py" else relative[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]  # `from .x import module`
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == PACKAGE and module_file(n, root) is not None)
    return found


def app_modules(root: Path = REPO) -> list[Path]:
    """Every nanospec_core file app.py reaches through imports, with the __init__.py of each package on the way."""
    seen: set[str] = set()
    todo = sorted(imported_modules(root / APP_FILE, root))
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            parent = ".".join(parts[:depth])
            if parent not in seen:
                seen.add(parent)
                todo += sorted(imported_modules(module_file(parent, root), root) - seen)
    return sorted(module_file(name, root).relative_to(root) for name in seen)


def asset_files(assets: Path = ASSETS) -> list[Path]:
    """assets/, every file (hidden files and caches aside), relative to the repository."""
    return sorted(p.relative_to(assets.parent) for p in assets.rglob("*")
                  if p.is_file() and not any(part.startswith(".") or part == "__pycache__"
                                             for part in p.relative_to(assets).parts))


def space_sources(root: Path = REPO) -> list[Path]:
    """What the Space copies from the repository, relative to it."""
    return [Path(APP_FILE), *app_modules(root), *asset_files(root / "assets")]


# ---------------------------------------------------------------------------------------------------------
# The two files written for the Space

def runtime_requirements(root: Path = REPO) -> list[str]:
    """requirements.txt's requirement lines (comments and options off): the runtime set."""
    lines = []
    for line in (root / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-")


def space_requirements(hardware: Hardware, root: Path = REPO) -> str:
    """The Space's requirements.txt: the runtime set with the variant's pins, its index line and extras."""
    lines = [f"{MARK}: the runtime set of the repository's requirements.txt.", f"# {hardware.why}"]
    if hardware.extra_index:
        lines.append(f"--extra-index-url {hardware.extra_index}")
    for line in runtime_requirements(root):
        name = requirement_name(line)
        lines.append(f"{name}=={hardware.pins[name]}" if name in hardware.pins else line)
    lines += list(hardware.extra)
    return "\n".join(lines) + "\n"


def front_matter(root: Path = REPO) -> str:
    """The YAML front matter of the repository's README (between the first two '---' lines), as written."""
    text = (root / "README.md").read_text()
    match = re.match(r"---\n(.*?\n)---\n", text, re.S)
    if not match:
        raise NanoSpecError("README.md has no front matter (the Space's configuration)")
    return match.group(1)


def space_readme(hardware: Hardware, root: Path = REPO) -> str:
    """README.md for the Space: the repository's front matter with this variant's python and hardware."""
    config = front_matter(root)
    config = re.sub(r"(?m)^python_version:.*$", f'python_version: "{hardware.python_version}"', config)
    suggested = f"suggested_hardware: {hardware.suggested}\n" if hardware.suggested else ""
    config = re.sub(r"(?m)^suggested_hardware:.*\n", suggested, config)
    return f"---\n{config}---\n\n{SPACE_BODY}"


# ---------------------------------------------------------------------------------------------------------
# Build, list, upload

def storage(path: Path) -> str:
    """'xet' or 'plain': how the Hub stores this file, by the preupload rule (size, then a text sample)."""
    if path.stat().st_size > XET_ABOVE_BYTES:
        return "xet"
    sample = path.read_bytes()[:SAMPLE_BYTES]
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(sample) - 3:  # not a multi-byte character cut by the sample's end
            return "xet"
    return "xet" if b"\x00" in sample else "plain"


def build_space(out: Path, hardware: Hardware, root: Path = REPO) -> list[Path]:
    """Write the Space folder into `out` (emptied first); returns its files, relative to it."""
    out = Path(out)
    if out.resolve() == root.resolve() or root.resolve().is_relative_to(out.resolve()):
        raise NanoSpecError(f"--out {out} would hold the repository itself: choose a new folder")
    if out.exists():  # only a folder this command wrote earlier is replaced
        written = (out / "requirements.txt").is_file() and (out / "requirements.txt").read_text().startswith(MARK)
        if any(out.iterdir()) and not written:
            raise NanoSpecError(f"--out {out} exists and is not a Space folder: choose a new or empty folder")
        shutil.rmtree(out)
    for source in space_sources(root):
        (out / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / source, out / source)
    (out / "requirements.txt").write_text(space_requirements(hardware, root))
    (out / "README.md").write_text(space_readme(hardware, root))
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())


def listing(out: Path, files: list[Path]) -> str:
    """One line per file (size, storage, path) and a total per storage kind."""
    rows, totals = [], {}
    for name in files:
        size, kind = (out / name).stat().st_size, storage(out / name)
        totals[kind] = totals.get(kind, 0) + size
        rows.append(f"{size:>12,}  {kind:<5}  {name.as_posix()}")
    summary = ", ".join(f"{kind} {total / 1e6:.1f} MB" for kind, total in sorted(totals.items()))
    return "\n".join(rows + [f"{len(files)} files: {summary}"])


def upload_space(out: Path, repo: str, hardware: Hardware, api=None, private: bool = False) -> str:
    """Create the Space (if new) and upload the folder as one commit; the commit's URL. `api`: an HfApi."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        user = api.whoami()
    except Exception as error:  # noqa: BLE001 - no token, a bad one, offline: one line each
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise NanoSpecError(f"cannot upload to the Hub: {first} (log in with `hf auth login` or set HF_TOKEN; "
                            "--dry-run builds the folder without a token)") from None
    try:
        api.create_repo(repo, repo_type="space", space_sdk="gradio", space_hardware=hardware.flavor,
                        private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, repo_type="space", folder_path=str(out), delete_patterns="*",
                                   commit_message="NanoSpec Space (python -m nanospec_core space)")
    except Exception as error:  # noqa: BLE001
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise NanoSpecError(f"uploading the Space {repo} as {user.get('name', '?')} failed: {first}") from None
    return str(getattr(commit, "commit_url", commit))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", required=True, help="the Space's id on the Hub, USER/NAME")
    parser.add_argument("--hardware", default="cpu-basic", choices=list(HARDWARE),
                        help="which requirements and Python the Space gets (cpu-basic: torch's CPU build)")
    parser.add_argument("--out", default=None,
                        help=f"write the folder here (default: {DRY_RUN_OUT} with --dry-run, else a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="build and list the folder; upload nothing")
    parser.add_argument("--private", action="store_true", help="create the Space private")


def run(args, api=None) -> int:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", args.repo):
        raise NanoSpecError(f"--repo must be USER/NAME, got {args.repo!r}")
    hardware = HARDWARE[args.hardware]
    temporary = None
    if args.out is None and not args.dry_run:  # an upload needs the folder only until it is sent
        temporary = tempfile.TemporaryDirectory(prefix="nanospec-space-")
    out = Path(args.out or (Path(temporary.name) / "space" if temporary else DRY_RUN_OUT))
    try:
        files = build_space(out, hardware)
        print(listing(out, files))
        if args.dry_run:
            print(f"dry run: the Space folder is {out}; nothing uploaded to {args.repo}")
            return 0
        print(f"uploaded: {upload_space(out, args.repo, hardware, api, args.private)}")
        return 0
    finally:
        if temporary is not None:
            temporary.cleanup()

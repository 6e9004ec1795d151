"""Where the project's files are, found from the package, never from the working directory.

The shipped assets (EAGLE heads, frequency tables) sit beside the package in assets/; the Spec-Bench questions in
the shared data folder next to the repository. NANOSPEC_ASSETS and NANOSPEC_QUESTIONS point elsewhere (an
installed copy, a Space, a CI checkout with other folders).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
ASSETS = Path(os.environ.get("NANOSPEC_ASSETS", REPO / "assets"))
DEFAULT_QUESTIONS = Path(os.environ.get("NANOSPEC_QUESTIONS",
                                        REPO.parent / "shared" / "data" / "spec_bench" / "question.jsonl"))
# Shipped head kinds, the default first. EAGLE-3 since its stage-2 head: held-out top-1 0.380 against EAGLE-2's 0.286
# (same positions), and NanoSpec ran 1.27x `hf` with it against 1.21x with EAGLE-2, each at its auto tree, in
# back-to-back 13-prompt Spec-Bench runs (docs/results.md). `--head eagle2` keeps the EAGLE-2 baseline loadable.
HEAD_KINDS = ("eagle3", "eagle2")


def shipped_head_dir(model_key: str, kind: str | None = None) -> Path:
    """assets/heads/<model>/<kind>; kind None: the first of HEAD_KINDS that ships (a folder with config.json)."""
    base = ASSETS / "heads" / model_key
    if kind is not None:
        return base / kind
    for name in HEAD_KINDS:
        if (base / name / "config.json").is_file():
            return base / name
    return base / HEAD_KINDS[0]


def frequency_table(model_key: str) -> Path:
    return ASSETS / "frequency" / f"{model_key}.safetensors"

"""Where the project's files are, found from the package, never from the working directory.

The shipped assets (EAGLE heads, frequency tables, Spec-Bench's questions for the benchmark) sit beside the package
in assets/, so a Space built from the repository (space.py) finds them too. NANOSPEC_ASSETS and NANOSPEC_QUESTIONS
point elsewhere (an installed copy, a CI checkout with other folders).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
ASSETS = Path(os.environ.get("NANOSPEC_ASSETS", REPO / "assets"))
# Spec-Bench (github.com/hemingkx/Spec-Bench, Apache-2.0): evaluation only, no head or asset is built from it
DEFAULT_QUESTIONS = Path(os.environ.get("NANOSPEC_QUESTIONS", ASSETS / "spec_bench" / "question.jsonl"))
# Head kinds a model may ship, the default first. Only EAGLE-3 ships for the embedded target: its EAGLE-2 head was
# removed because a third of its training conversations came from ShareGPT's evaluation range (records >= 8,000).
# `--head eagle2` loads one again wherever assets/heads/<model>/eagle2 holds a head trained on allowed records.
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


def head_data(model_key: str) -> Path:
    """data/head/<model>: the committed head-training corpus (training/corpus.py), beside the repository's assets
    but not in them (the Space does not need it). NANOSPEC_HEAD_DATA points elsewhere."""
    return Path(os.environ.get("NANOSPEC_HEAD_DATA", REPO / "data" / "head")) / model_key

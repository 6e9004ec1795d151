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
# Shipped head kinds, the default first. EAGLE-2 stays the default for now: the stage-1 EAGLE-3 head keeps a 25%
# longer held-out chain on the target's own answers, but on Spec-Bench at the same tree it accepted no more
# (tau 1.68 vs 1.70, 13 prompts, docs/results.md) and its layer costs more per level. Swap when it measures faster.
HEAD_KINDS = ("eagle2", "eagle3")


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

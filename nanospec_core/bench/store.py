"""A benchmark's files: per-prompt records and the settings they were measured with, written so that a killed run
loses at most the prompt in flight and `bench --resume` can continue it (same settings, finished prompts skipped).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ..errors import NanoSpecError


def clean(value):
    """JSON-safe scalar: NaN / NA -> None, numpy scalars -> Python."""
    if value is pd.NA:
        return None
    if hasattr(value, "item") and not isinstance(value, (list, dict)):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def write_rows(rows: list[dict], config: dict, out: Path) -> Path:
    """per_prompt.jsonl (+ config.json), each written to a temp file and renamed: a kill never leaves half a file."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("config.json", json.dumps(config, indent=1)),
                       ("per_prompt.jsonl", "".join(json.dumps({k: clean(v) for k, v in row.items()}) + "\n"
                                                    for row in rows))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
    return out / "per_prompt.jsonl"


def load_previous(out: Path, config: dict) -> list[dict]:
    """Rows of an earlier run in `out` for --resume; an error when its settings differ from this run's."""
    rows_path, config_path = out / "per_prompt.jsonl", out / "config.json"
    if not rows_path.exists():
        return []
    if not config_path.exists():
        raise NanoSpecError(f"cannot resume {out}: it has no config.json")
    old = json.loads(config_path.read_text())
    changed = sorted(k for k in config if old.get(k) != json.loads(json.dumps(config[k])))  # reports aside
    if changed:
        raise NanoSpecError(f"cannot resume {out}: settings differ ({', '.join(changed)}); use another --out")
    return [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line.strip()]

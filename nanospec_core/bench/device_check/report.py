"""Sections of the GPU check and the report they make: every section runs guarded (one failure stops none of the
others) and ends as passed, failed or skipped, with its reason, its checks and its figures.

A section is a function `fn(ctx) -> None` that records into `ctx.section`:
    ctx.check(name, ok, detail)    a named condition (any False one fails the section)
    ctx.figure(name, value)        a measured number or a small table (list of dict rows)
    raise Skip(reason)             nothing to run here (e.g. a CUDA-only part on a CPU)
An exception anywhere else fails the section with its type, message and the last traceback lines.
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class Skip(Exception):
    """A section (or a part of one) that cannot run on this machine; the message says why."""


@dataclass
class SectionResult:
    name: str
    status: str = "passed"  # passed | failed | skipped
    reason: str = ""  # why it failed or was skipped
    checks: dict = field(default_factory=dict)  # name -> {"ok": bool, "detail": str}
    figures: dict = field(default_factory=dict)  # name -> number, string or list of row dicts
    notes: list = field(default_factory=list)  # parts skipped inside a section that otherwise ran
    seconds: float = 0.0


class Context:
    """What every section gets: the run's settings (device, quick, shapes) and the section being recorded."""

    def __init__(self, device: str, quick: bool, shapes, out_dir: Path):
        self.device, self.quick, self.shapes, self.out_dir = device, quick, shapes, out_dir
        self.cuda = device == "cuda"
        self.section: SectionResult | None = None
        self.cache: dict = {}  # models built by one section and reused by the next (the embedded-shape target)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.section.checks[name] = {"ok": bool(ok), "detail": str(detail)}
        return bool(ok)

    def figure(self, name: str, value) -> None:
        self.section.figures[name] = value

    def note(self, line: str) -> None:
        self.section.notes.append(line)


def run_section(ctx: Context, name: str, fn: Callable[[Context], None]) -> SectionResult:
    ctx.section = result = SectionResult(name)
    start = time.perf_counter()
    try:
        fn(ctx)
    except Skip as skip:
        result.status, result.reason = "skipped", str(skip)
    except Exception as error:  # noqa: BLE001 - one section failing must not hide the others
        tail = traceback.format_exc().strip().splitlines()[-6:]
        result.status, result.reason = "failed", f"{type(error).__name__}: {error} | " + " / ".join(tail)
    if result.status == "passed":
        bad = [key for key, value in result.checks.items() if not value["ok"]]
        if bad:
            result.status, result.reason = "failed", "checks failed: " + ", ".join(bad)
    result.seconds = round(time.perf_counter() - start, 2)
    ctx.section = None
    return result


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(header: dict, results: list[SectionResult]) -> str:
    lines = [f"# NanoSpec GPU check: {header['device_name']}", "",
             " | ".join(f"{k} {v}" for k, v in header.items() if k != "device_name"), "",
             "| section | status | seconds | reason |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds} | {r.reason[:200]} |" for r in results]
    for r in results:
        lines += ["", f"## {r.name}: {r.status}", ""]
        if r.reason:
            lines += [f"Reason: {r.reason}", ""]
        lines += [f"- {'PASS' if c['ok'] else 'FAIL'} {name}: {c['detail']}" for name, c in r.checks.items()]
        lines += [f"- note: {note}" for note in r.notes]
        for name, value in r.figures.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                keys = list(value[0])
                lines += ["", f"{name}:", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in value]
            else:
                lines.append(f"- {name}: {_cell(value)}")
    return "\n".join(lines) + "\n"


def summary_table(results: list[SectionResult]) -> str:
    """The short table printed at the end: one line per section."""
    width = max(len(r.name) for r in results)
    rows = [f"{r.name:<{width}}  {r.status:<7}  {r.seconds:>6.1f} s  {r.reason[:90]}" for r in results]
    return "\n".join([f"{'section':<{width}}  status   time      reason", *rows])


def write(out_dir: Path, header: dict, results: list[SectionResult]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"header": header, "sections": {r.name: r.__dict__ for r in results},
            "passed": all(r.status != "failed" for r in results)}
    json_path, md_path = out_dir / "gpu_check.json", out_dir / "gpu_check.md"
    json_path.write_text(json.dumps(data, indent=1, default=str))
    md_path.write_text(markdown(header, results))
    return json_path, md_path

"""A trained head's model card: the loss curve, the run's facts, and one row per training stage (stages.json)."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path


def plot_loss(csv_path: Path, png_path: Path) -> Path | None:
    """Loss terms and sampled top-1 agreement per step -> PNG (matplotlib; None when it is not installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = list(csv.DictReader(csv_path.open()))
    steps = [int(r["step"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("loss", "vloss", "ploss"):
        left.plot(steps, [float(r[key]) for r in rows], label=key, linewidth=1)
    left.set(yscale="log", xlabel="step", title="EAGLE loss = vloss + 0.1 ploss")
    left.legend()
    right.plot(steps, [float(r["acc"]) for r in rows], linewidth=1)
    right.set(xlabel="step", title="train top-1 agreement (sampled softmax)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def facts_table(info: dict) -> list[str]:
    lines = ["| | |", "|---|---|"]
    for key, value in info.items():
        if key in ("command", "stages", "heldout", "heldout_init", "data"):
            continue
        lines.append(f"| {key} | {value} |")
    return lines


def heldout_table(info: dict) -> list[str]:
    """Held-out figures per dtype and kind, this head and the warm start, on the same positions."""
    lines = []
    for label, scores in (("this head", info.get("heldout")), ("warm start", info.get("heldout_init"))):
        for dtype, parts in (scores or {}).items():
            for kind, m in parts.items():
                levels = [f"{m.get(f'top1_level{r}_given_prev', 0):.3f}" for r in (2, 3, 4)]
                lines.append(f"| {label} | {dtype} | {kind} | {m['positions']} | {m['top1']:.3f} | "
                             + " | ".join(levels) + f" | {m['expected_chain']:.3f} |")
    if not lines:
        return []
    return ["| head | features | kind | positions | top-1 | level 2 given 1 | level 3 given 2 | level 4 given 3 | "
            "expected chain |", "|---|---|---|---|---|---|---|---|---|", *lines]


def data_lines(info: dict) -> list[str]:
    data = info.get("data")
    if not data:
        return []
    items = ", ".join(f"{kind} {row['items']} items / {row['answer_tokens']:,} answer tokens" for kind, row in data.items())
    return [f"- Data: the committed corpus `{info.get('corpus')}` (the target's own answers, token ids with a "
            f"manifest: training/corpus.py): {items}. Sources and the records this stage may have seen: ShareGPT "
            "records before position 8,000 only (each item's position is in the manifest), completion prompts cut "
            "from the standard library's and the installed packages' source, and tasks over installed packages' "
            "documentation; nothing from Spec-Bench, HumanEval or ShareGPT's evaluation range.",
            f"- Held-out: {info.get('heldout_list')}; no training item shares a base conversation, a source file, "
            "a package or a normalised first turn with it (training/split.py)."]


def carried_sections(previous: str) -> str:
    """The earlier stages' prose (every '## Stage N' section of the warm-start head's card)."""
    marker = "\n## Stage "
    sections = [part for part in previous.split(marker)[1:] if not part.startswith("s (")]
    return "".join(marker + part.split("\nRerun:")[0].rstrip() + "\n" for part in sections)


def write_card(out: Path, info: dict, previous: str = "") -> None:
    kind = {"eagle2": "EAGLE-2", "eagle3": "EAGLE-3"}[info.get("kind", "eagle2")]
    feature, ce = info.get("loss_weights", {"feature": 1.0, "cross_entropy": 0.1}).values()
    lines = [f"# {kind} draft head for {info['model']}", "",
             (f"Trained on CPU by `python -m nanospec_core train-head` (per unrolled level: {feature} x SmoothL1 on "
              f"the next feature + {ce} x sampled-softmax cross-entropy against the target's top-8 next-token "
              f"distribution; uniform feature noise as in EAGLE)."), "", *facts_table(info)]
    stages = info.get("stages") or []
    if stages:
        columns = list(dict.fromkeys(c for row in stages for c in row))
        lines += ["", "## Stages (one row per training session; stages.json holds the same, machine-readable)", "",
                  "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in stages]
    number = len(stages) or 1
    lines += ["", f"## Stage {number} ({time.strftime('%Y-%m-%d')}, {info.get('machine', '')})", "",
              *data_lines(info), ""]
    lines += heldout_table(info)
    lines += ["", "Rerun:", "", "```", info.get("command", ""), "```"]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n" + carried_sections(previous))


def stage_rows(out: Path, init: str | None, info: dict, metrics: dict) -> list[dict]:
    """The earlier stages (from the warm-start head's stages.json, else the output folder's) plus this one."""
    for folder in ([Path(init)] if init else []) + [out]:
        if (folder / "stages.json").is_file():
            rows = json.loads((folder / "stages.json").read_text())
            break
    else:
        rows = []
    rows = rows if init else []  # a fresh (random) start begins a new history
    data = info.get("data") or {}
    rows.append({"stage": len(rows) + 1, "init": init or "random", "sequences": info["train_sequences"],
                 **{f"{kind}_items": row["items"] for kind, row in data.items()},
                 "scored_tokens": info["train_scored_tokens"],
                 "tokens_seen": info["tokens_seen"], "train_min": round(info["train_wall_s"] / 60, 1),
                 "heldout_top1": round(metrics["top1"], 3),
                 **{f"l{r}_given_prev": round(metrics[f"top1_level{r}_given_prev"], 3)
                    for r in range(2, 5) if f"top1_level{r}_given_prev" in metrics},
                 "expected_chain": round(metrics["expected_chain"], 3), "machine": info["machine"],
                 "heldout_set": info.get("heldout_list", "")})
    return rows

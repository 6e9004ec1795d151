"""A trained head's model card: the loss curve, the run's facts, and one row per training stage (stages.json)."""
from __future__ import annotations

import csv
import json
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


def write_card(out: Path, info: dict) -> None:
    kind = {"eagle2": "EAGLE-2", "eagle3": "EAGLE-3"}[info.get("kind", "eagle2")]
    feature, ce = info.get("loss_weights", {"feature": 1.0, "cross_entropy": 0.1}).values()
    lines = [f"# {kind} draft head for {info['model']}", "",
             (f"Trained on CPU by `python -m nanospec_core train-head` (per unrolled level: {feature} x SmoothL1 on "
              f"the next feature + {ce} x sampled-softmax cross-entropy against the target's top-8 next-token "
              f"distribution; uniform feature noise as in EAGLE)."), "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in info.items() if key not in ("command", "stages")]
    stages = info.get("stages") or []
    if stages:
        columns = list(stages[0])
        lines += ["", "## Stages (one row per training session; stages.json holds the same, machine-readable)", "",
                  "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in stages]
    lines += ["", "Rerun:", "", "```", info.get("command", ""), "```", ""]
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


def stage_rows(out: Path, init: str | None, info: dict, metrics: dict) -> list[dict]:
    """The earlier stages (from the warm-start head's stages.json, else the output folder's) plus this one."""
    for folder in ([Path(init)] if init else []) + [out]:
        if (folder / "stages.json").is_file():
            rows = json.loads((folder / "stages.json").read_text())
            break
    else:
        rows = []
    rows = rows if init else []  # a fresh (random) start begins a new history
    rows.append({"stage": len(rows) + 1, "init": init or "random", "sequences": info["sequences"],
                 "generated_chat": info["generated_chat"], "generated_code": info["generated_code"],
                 "sharegpt_text": info["sharegpt_text"], "scored_tokens": info["train_scored_tokens"],
                 "tokens_seen": info["tokens_seen"], "train_min": round(info["train_wall_s"] / 60, 1),
                 "heldout_top1": round(metrics["top1"], 3),
                 **{f"l{r}_given_prev": round(metrics[f"top1_level{r}_given_prev"], 3)
                    for r in range(2, 5) if f"top1_level{r}_given_prev" in metrics},
                 "expected_chain": round(metrics["expected_chain"], 3), "machine": info["machine"]})
    return rows

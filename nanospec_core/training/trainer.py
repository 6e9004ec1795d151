"""The training loop of an EAGLE head on a CPU (stage.py feeds it a stage's data and ships the result).

Objective (training/loss.py): per unrolled draft level ("training-time test", `--levels`), a sampled-softmax
cross-entropy against the target's top-8 next-token distribution (candidate rows: every top-8 id of the sequence
plus `--negatives` random ones; the full 151,936-row lm head would cost several times the rest of the step), plus
a small SmoothL1 term pulling the head's normed output towards the target's final hidden state. EAGLE-3's lm head
is the target's own (tied, frozen, not saved). Input features get EAGLE's uniform noise U(-0.5, 0.5) * 0.2 * 512 / F.
AdamW (0.9, 0.95), gradient clipping, warmup + cosine decay, float32 master weights, checkpoints that resume; a
bf16 head is exported at every checkpoint so a run cut short is still usable.
"""
from __future__ import annotations

import csv
import functools
import math
import random
import time
from pathlib import Path

import torch

from ..errors import NanoSpecError
from .loss import sequence_loss

FEATURE_NOISE = 0.2  # EAGLE's uniform-noise "std"; scaled by 512 / H as in its training script


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def trainable(head) -> list:
    return [p for p in head.parameters() if p.requires_grad]


def save_checkpoint(path: Path, head, optimizer, state: dict) -> None:
    names = {id(p): name for name, p in head.named_parameters()}
    weights = {names[id(p)]: p.detach().clone() for p in trainable(head)}
    tmp = path.with_suffix(".tmp")
    torch.save({"weights": weights, "optimizer": optimizer.state_dict(), "state": state}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, head, optimizer) -> dict:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(head.named_parameters())
    with torch.no_grad():
        for name, value in blob["weights"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(blob["optimizer"])
    return blob["state"]


def train(head, train_seqs, lm_head_weight, work: Path, *, minutes: float | None = None, steps: int | None = None,
          tokens_per_step: int = 4096, lr: float = 5e-4, warmup: int = 20, negatives: int = 1024,
          noise: float = FEATURE_NOISE, clip: float = 0.5, checkpoint_every: int = 10, seed: int = 0, levels: int = 1,
          feature_weight: float = 1.0, cls_weight: float = 0.1, on_checkpoint=None,
          compute_dtype: torch.dtype = torch.float32, finish_on: list[int] | None = None,
          finish_fraction: float = 0.0) -> dict:
    """Train `head` in place; resumes from work/checkpoint.pt. Stops after `steps` or `minutes` of this call.

    compute_dtype: the forward and backward matmuls run in it under autocast (float32 master weights and optimizer
    state either way); bf16 where the machine probe measured bf16 linears faster (stage.py's `--train-dtype auto`).

    With only `minutes`, the total step count (which fixes the cosine schedule) is set from the measured time of
    the first 3 steps and stored in the checkpoint, so a resumed run keeps the same schedule.

    finish_on, finish_fraction: the last finish_fraction of the steps draw only train_seqs[finish_on] (a stage
    finishes on the target's own answers, after epochs that mix in text it only read).
    """
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path, csv_path = work / "checkpoint.pt", work / "loss.csv"
    optimizer = torch.optim.AdamW(trainable(head), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    state = {"step": 0, "total_steps": steps, "epoch": 0, "cursor": 0, "tokens": 0, "train_s": 0.0,
             "finish_cursor": 0}
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, head, optimizer)
        log(f"resumed from step {state['step']} ({state['tokens']} tokens)")
        if csv_path.exists():  # drop rows logged after the checkpoint by a killed run
            rows = csv_path.read_text().splitlines()
            kept = rows[:1] + [r for r in rows[1:] if int(r.split(",")[0]) <= state["step"]]
            csv_path.write_text("\n".join(kept) + "\n")
    elif csv_path.exists():
        csv_path.unlink()
    if steps is not None:
        state["total_steps"] = steps
    head.train()
    device = next(head.parameters()).device.type
    autocast = torch.autocast(device, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    generator = torch.Generator().manual_seed(seed + state["step"])
    deadline = time.time() + minutes * 60 if minutes else None
    started, step_tokens = time.time(), 0
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as sink:
        writer = csv.writer(sink)
        if new_file:
            writer.writerow(["step", "tokens", "lr", "loss", "vloss", "ploss", "acc", "tok_per_s", "wall_s",
                             "forward_s", "backward_s", "update_s"])
        while state["total_steps"] is None or state["step"] < state["total_steps"]:
            if deadline and time.time() > deadline:
                break
            t0, n_tok, sums = time.time(), 0, {"loss": 0.0, "vloss": 0.0, "ploss": 0.0, "correct": 0}
            optimizer.zero_grad(set_to_none=True)
            finishing = bool(finish_on) and state["total_steps"] is not None and \
                state["step"] >= state["total_steps"] * (1 - finish_fraction)
            # One autocast context and one backward per step: the bf16 copies of the weights are cast once per step
            # (autocast's cache lives as long as its context), and the step's sequences share one backward pass.
            total = 0.0
            with autocast:
                while n_tok < tokens_per_step:
                    seq = next_sequence(train_seqs, state, seed, finish_on if finishing else None)
                    loss, stats = sequence_loss(head, seq, lm_head_weight, negatives, noise, generator,
                                                levels=levels, feature_weight=feature_weight, cls_weight=cls_weight)
                    if loss is None:
                        continue
                    total = total + loss * stats["n"]
                    n_tok += stats["n"]
                    for key in ("vloss", "ploss"):
                        sums[key] += stats[key] * stats["n"]
                    sums["loss"] += float(loss.detach()) * stats["n"]
                    sums["correct"] += stats["correct"]
            t_forward = time.time()
            (total / n_tok).backward()  # the token-weighted mean over the step
            t_backward = time.time()
            current_lr = lr_at(state["step"], state["total_steps"] or 10 ** 9, lr, warmup)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            torch.nn.utils.clip_grad_norm_(trainable(head), clip)
            optimizer.step()
            dt = time.time() - t0
            split = (t_forward - t0, t_backward - t_forward, time.time() - t_backward)  # forward, backward, update
            state["step"] += 1
            state["tokens"] += n_tok
            state["train_s"] += dt
            step_tokens += n_tok
            row = [state["step"], state["tokens"], f"{current_lr:.3g}", sums["loss"] / n_tok, sums["vloss"] / n_tok,
                   sums["ploss"] / n_tok, sums["correct"] / n_tok, n_tok / dt, round(state["train_s"], 1), *split]
            writer.writerow([f"{v:.4f}" if isinstance(v, float) else v for v in row])
            sink.flush()
            log(f"step {state['step']}/{state['total_steps']} loss {row[3]:.4f} (v {row[4]:.4f} p {row[5]:.3f}) "
                f"acc {row[6]:.3f} lr {current_lr:.2e} {n_tok / dt:.0f} tok/s")
            if state["total_steps"] is None and state["step"] == 3 and deadline:
                per_step = (time.time() - started) / 3
                state["total_steps"] = state["step"] + int((deadline - time.time()) / per_step)
                log(f"schedule: {state['total_steps']} steps ({per_step:.1f} s/step, {minutes} min budget)")
            if state["step"] % checkpoint_every == 0 or state["step"] == state["total_steps"]:
                save_checkpoint(ckpt_path, head, optimizer, state)
                if on_checkpoint:
                    on_checkpoint(state)
    save_checkpoint(ckpt_path, head, optimizer, state)
    return state


@functools.lru_cache(maxsize=2)
def epoch_order(count: int, seed: int) -> list[int]:
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def next_sequence(train_seqs, state: dict, seed: int, only: list[int] | None = None) -> dict:
    """The next training sequence: epochs over a seeded shuffle of all of them (state's epoch and cursor), or,
    with `only`, a seeded ring over those indices (the final phase on the target's own answers)."""
    if only:
        cursor = state.setdefault("finish_cursor", 0)
        state["finish_cursor"] = cursor + 1
        ring = epoch_order(len(only), seed + 10 ** 6 + cursor // len(only))  # a shuffle per pass, cached
        seq = train_seqs[only[ring[cursor % len(only)]]]
    else:
        if state["cursor"] >= len(train_seqs):
            state["epoch"] += 1
            state["cursor"] = 0
        seq = train_seqs[epoch_order(len(train_seqs), seed + state["epoch"])[state["cursor"]]]
        state["cursor"] += 1
    return seq.load() if hasattr(seq, "load") else seq  # data.ShardSequence: read from disk once


def export(head, out: Path, extra: dict) -> None:
    """bf16 head (config.json + model.safetensors) via eagle_checkpoint.save_head, written to a temp folder then swapped in."""
    import shutil

    from ..models.eagle_checkpoint import save_head

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_head(head, tmp, extra_config=extra)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


LOSS_WEIGHTS = {"eagle2": (1.0, 0.1), "eagle3": (0.1, 1.0)}  # (feature, cross-entropy): EAGLE's; EAGLE-3 mostly CE


def make_head(kind: str, target, init: str | None, seed: int):
    """A float32 head to train (bf16 master weights lose small updates), random or warm-started from `init`."""
    from ..models.eagle import random_head
    from ..models.eagle_checkpoint import load_head

    head = random_head(target, kind, seed=seed, **({"tied_lm_head": True} if kind == "eagle3" else {})).float()
    if init:  # warm start from an earlier head (a checkpoint in --work still wins: it resumes)
        start = load_head(init, target)
        if start.kind != kind:
            raise NanoSpecError(f"--init {init} is an {start.kind} head, not {kind}")
        with torch.no_grad():
            own = dict(start.named_parameters())
            for name, param in head.named_parameters():
                param.copy_(own[name].float())
    return head

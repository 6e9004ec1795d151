"""Train an EAGLE-3 (default) or EAGLE-2 draft head on a CPU: the target's own answers, then training, then export.

    python -m nanospec_core train-head --kind eagle3 --out assets/heads/qwen2.5-coder-0.5b-instruct/eagle3 \
        --work runs/head_eagle3 --generate-minutes 30 --extract-minutes 11 --minutes 45
    (add --init <shipped head> to warm-start a later stage; the held-out split is fixed by key, generate.held_out)

Data (training/generate.py): the target answers ShareGPT prompts and standard-library completion prompts itself,
in batches, with its features kept as it decodes; then ShareGPT conversations as written (forward only), which
cost a tenth per token. Both are resumable shards holding EAGLE-2 (final hidden) and EAGLE-3 (aux layers) features.
The target runs in the fastest dtype measured on this machine (machine.py).
Objective (training/loss.py): per unrolled draft level ("training-time test", `--levels`), a sampled-softmax
cross-entropy against the target's top-8 next-token distribution (candidate rows: every top-8 id of the sequence
plus `--negatives` random ones; the full 151,936-row lm head would cost several times the rest of the step), plus
a small SmoothL1 term pulling the head's normed output towards the target's final hidden state. EAGLE-3's lm head
is the target's own (tied, frozen, not saved). Input features get EAGLE's uniform noise U(-0.5, 0.5) * 0.2 * 512 / F.
AdamW (0.9, 0.95), gradient clipping, warmup + cosine decay, float32 master weights, checkpoints that resume; a
bf16 head is exported at every checkpoint so a run cut short is still usable. The held-out measure (full
vocabulary, chains as the head drafts them) and one stage row per session go into the model card and stages.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from ..errors import NanoSpecError
from .card import plot_loss, stage_rows, write_card
from .loss import evaluate, sequence_loss

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
          feature_weight: float = 1.0, cls_weight: float = 0.1, on_checkpoint=None) -> dict:
    """Train `head` in place; resumes from work/checkpoint.pt. Stops after `steps` or `minutes` of this call.

    With only `minutes`, the total step count (which fixes the cosine schedule) is set from the measured time of
    the first 3 steps and stored in the checkpoint, so a resumed run keeps the same schedule.
    """
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path, csv_path = work / "checkpoint.pt", work / "loss.csv"
    optimizer = torch.optim.AdamW(trainable(head), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    state = {"step": 0, "total_steps": steps, "epoch": 0, "cursor": 0, "tokens": 0, "train_s": 0.0}
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
    generator = torch.Generator().manual_seed(seed + state["step"])
    deadline = time.time() + minutes * 60 if minutes else None
    started, step_tokens = time.time(), 0
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as sink:
        writer = csv.writer(sink)
        if new_file:
            writer.writerow(["step", "tokens", "lr", "loss", "vloss", "ploss", "acc", "tok_per_s", "wall_s"])
        while state["total_steps"] is None or state["step"] < state["total_steps"]:
            if deadline and time.time() > deadline:
                break
            order = list(range(len(train_seqs)))
            random.Random(seed + state["epoch"]).shuffle(order)
            t0, n_tok, sums = time.time(), 0, {"loss": 0.0, "vloss": 0.0, "ploss": 0.0, "correct": 0}
            optimizer.zero_grad(set_to_none=True)
            while n_tok < tokens_per_step:
                if state["cursor"] >= len(order):
                    state["epoch"] += 1
                    state["cursor"] = 0
                    order = list(range(len(train_seqs)))
                    random.Random(seed + state["epoch"]).shuffle(order)
                seq = train_seqs[order[state["cursor"]]]
                state["cursor"] += 1
                loss, stats = sequence_loss(head, seq, lm_head_weight, negatives, noise, generator, levels=levels,
                                            feature_weight=feature_weight, cls_weight=cls_weight)
                if loss is None:
                    continue
                (loss * stats["n"] / tokens_per_step).backward()  # token-weighted mean over the step
                n_tok += stats["n"]
                for key in ("vloss", "ploss"):
                    sums[key] += stats[key] * stats["n"]
                sums["loss"] += float(loss.detach()) * stats["n"]
                sums["correct"] += stats["correct"]
            current_lr = lr_at(state["step"], state["total_steps"] or 10 ** 9, lr, warmup)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            torch.nn.utils.clip_grad_norm_(trainable(head), clip)
            optimizer.step()
            dt = time.time() - t0
            state["step"] += 1
            state["tokens"] += n_tok
            state["train_s"] += dt
            step_tokens += n_tok
            row = [state["step"], state["tokens"], f"{current_lr:.3g}", sums["loss"] / n_tok, sums["vloss"] / n_tok,
                   sums["ploss"] / n_tok, sums["correct"] / n_tok, n_tok / dt, round(state["train_s"], 1)]
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded", help="target: 'embedded', a hub id or a local folder")
    parser.add_argument("--out", required=True, help="folder for the trained head (config.json, model.safetensors)")
    parser.add_argument("--kind", default="eagle3", choices=("eagle3", "eagle2"),
                        help="eagle3: fused low/mid/high features, the target's lm head tied; eagle2: final feature")
    parser.add_argument("--work", default=None, help="data/checkpoints (default runs/head_<kind>_<key>)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--target-dtype", default="auto", help="auto: the fastest measured on this machine")
    parser.add_argument("--held-out-every", type=int, default=10, help="1 in n keys (by CRC) is held out")
    parser.add_argument("--minutes", type=float, default=40.0, help="training budget (this call)")
    parser.add_argument("--end-by", default=None, help="HH:MM (local): shorten training so the run ends by then")
    parser.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: fit --minutes)")
    parser.add_argument("--generate", type=int, default=2400, help="ShareGPT prompts the target answers itself")
    parser.add_argument("--code", type=int, default=700, help="standard-library completion prompts it answers")
    parser.add_argument("--generate-minutes", type=float, default=30.0, help="time budget for generation")
    parser.add_argument("--generate-batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length cap in generation")
    parser.add_argument("--temperature", type=float, default=0.7, help="odd batches sample at this temperature")
    parser.add_argument("--sharegpt", type=int, default=1200, help="ShareGPT conversations as written (forward)")
    parser.add_argument("--max-tokens", type=int, default=512, help="sequence length cap for ShareGPT text")
    parser.add_argument("--extract-minutes", type=float, default=11.0, help="time budget for that extraction")
    parser.add_argument("--answers", default=None, help="answers file from `nanospec_vllm answers` (features added "
                        "here, into <work>/answers)")
    parser.add_argument("--answers-minutes", type=float, default=60.0, help="time budget for those features")
    parser.add_argument("--levels", type=int, default=3, help="draft levels unrolled in the loss (1 = no TTT)")
    parser.add_argument("--init", default=None, help="head folder to start from (default: random)")
    parser.add_argument("--extract-only", action="store_true", help="stop after the data")
    parser.add_argument("--eval-head", default=None, help="only score this head on the held-out split, then stop")
    parser.add_argument("--tokens-per-step", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--negatives", type=int, default=1024, help="random rows added to the sampled softmax")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--train-on-prompts", action="store_true", help="score prompt positions too")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def heldout(head, held: list[dict], lm_head_weight: torch.Tensor) -> dict[str, dict]:
    """Held-out agreement on the target's own answers ('generated': what the head meets when drafting) and on
    ShareGPT text, 3,000 and 1,500 level-1 positions, four levels."""
    generated = [s for s in held if not s["key"].startswith("text:")]
    text = [s for s in held if s["key"].startswith("text:")]
    return {"generated": evaluate(head, generated, lm_head_weight, max_positions=3000, levels=4),
            "text": evaluate(head, text, lm_head_weight, max_positions=1500, levels=4)}


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


def run(args: argparse.Namespace) -> dict:
    from . import data as train_data
    from .generate import build_shards, held_out
    from ..machine import choose_runtime
    from ..models.eagle import default_aux_layers
    from ..models.loading import load_model
    from ..models.target import TargetModel
    from ..session import model_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    begin = time.time()
    runtime = choose_runtime(model_config(args.model), device=args.device, dtype=args.target_dtype)
    log(f"target runtime: {runtime.describe()}")
    loaded = load_model(args.model, dtype=runtime.torch_dtype, device=runtime.device,
                        layout=(runtime.backbone_layout, runtime.head_layout))
    target = TargetModel(loaded.hf_model)
    work = Path(args.work or f"runs/head_{args.kind}_{loaded.key}")
    out = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)

    # 1. Data (resumable shards; both kinds' features are stored): the target's own answers, then ShareGPT text.
    paths = build_shards(loaded, target, work, default_aux_layers(target.num_layers), generate=args.generate,
                         code=args.code, sharegpt=args.sharegpt, generate_minutes=args.generate_minutes,
                         extract_minutes=args.extract_minutes, batch_size=args.generate_batch,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         max_tokens=args.max_tokens, seed=args.seed, log=log)
    if args.answers:  # answers a serving engine generated (training/answers.py): one forward adds the features
        from .answers import answer_items

        paths += train_data.extract_shards(target, answer_items(Path(args.answers)), work / "answers", shard_size=32,
                                           aux_layers=default_aux_layers(target.num_layers),
                                           deadline=time.time() + args.answers_minutes * 60, log=log)
    if args.extract_only:
        log(f"extract-only: {len(paths)} shards in {work}")
        return {"shards": len(paths)}
    sequences = train_data.load_sequences(paths)
    held = [s for s in sequences if held_out(s["key"], args.held_out_every)]
    train_seqs = [s for s in sequences if not held_out(s["key"], args.held_out_every)]
    if args.train_on_prompts:  # scarce data: the target's predictions on prompt text are signal too
        train_seqs = [{**s, "loss_mask": torch.ones_like(s["loss_mask"])} for s in train_seqs]
    n_tokens = sum(int(s["loss_mask"].sum()) for s in train_seqs)
    sources = {name: sum(s["key"].startswith(prefix) for s in sequences)
               for name, prefix in (("generated_chat", "sharegpt:"), ("generated_code", ("stdlib:", "site:")),
                                    ("sharegpt_text", "text:"))}
    log(f"features: {len(train_seqs)} train sequences ({n_tokens} scored tokens), {len(held)} held out; {sources}")
    if args.eval_head:  # the same held-out positions for any head (EAGLE-2 or -3): a like-for-like comparison
        from ..models.eagle_checkpoint import load_head

        metrics = heldout(load_head(args.eval_head, target), held, target.lm_head_weight.float())
        log(f"held-out, {args.eval_head}: {metrics}")
        return metrics

    # 2. Train (fp32 master weights), exporting a bf16 head at every checkpoint so a partial run is usable.
    head = make_head(args.kind, target, args.init, args.seed)
    feature_weight, cls_weight = LOSS_WEIGHTS[args.kind]
    lm_head_weight = target.lm_head_weight.detach()
    info = {"model": loaded.key, "kind": args.kind, "target_dtype": str(runtime.torch_dtype).removeprefix("torch."),
            "machine": runtime.machine, "sequences": len(sequences), **sources, "levels": args.levels,
            "init": args.init, "train_sequences": len(train_seqs), "train_scored_tokens": n_tokens,
            "loss_weights": {"feature": feature_weight, "cross_entropy": cls_weight},
            "command": "python -m nanospec_core train-head " + " ".join(sys.argv[2:])}

    def on_checkpoint(state):
        export(head, out, {"training": dict(state)})
        png = plot_loss(work / "loss.csv", out / "loss.png")
        write_card(out, {**info, "steps": state["step"], "tokens_seen": state["tokens"],
                         "train_wall_s": round(state["train_s"]), "loss_curve": png and png.name})

    minutes = args.minutes
    if args.end_by:  # leave ~3 minutes for the held-out evaluation and the export
        hour, minute = map(int, args.end_by.split(":"))
        end = time.mktime(time.localtime()[:3] + (hour, minute, 0, 0, 0, -1))
        minutes = min(minutes, max(1.0, (end - time.time()) / 60 - 3))
        log(f"training budget: {minutes:.1f} min (ends by {args.end_by})")
    state = train(head, train_seqs, lm_head_weight, work, minutes=minutes, steps=args.steps,
                  tokens_per_step=args.tokens_per_step, lr=args.lr, warmup=args.warmup, negatives=args.negatives,
                  checkpoint_every=args.checkpoint_every, seed=args.seed, levels=args.levels,
                  feature_weight=feature_weight, cls_weight=cls_weight, on_checkpoint=on_checkpoint)
    both = heldout(head, held, lm_head_weight.float())
    metrics = both["generated"]
    log(f"held-out: {both}")
    last = list(csv.DictReader((work / "loss.csv").open()))[-20:]
    info.update({"steps": state["step"], "tokens_seen": state["tokens"], "train_wall_s": round(state["train_s"]),
                 "total_wall_s": round(time.time() - begin),
                 "final_loss_last20": round(sum(float(r["loss"]) for r in last) / max(len(last), 1), 4),
                 "heldout_top1": round(metrics["top1"], 4),
                 **{f"heldout_{k}": round(v, 4) for k, v in metrics.items() if k.startswith("top1_level")},
                 "heldout_expected_chain": round(metrics["expected_chain"], 3),
                 "heldout_positions": metrics["positions"]})
    if both["text"]["positions"]:  # no ShareGPT text in this stage's data: no text figure (not a 0.0)
        info.update({"heldout_text_top1": round(both["text"]["top1"], 4),
                     "heldout_text_expected_chain": round(both["text"]["expected_chain"], 3)})
    info["stages"] = stage_rows(out, args.init, info, metrics)
    export(head, out, {"training": {k: v for k, v in info.items() if k != "stages"}})
    (out / "stages.json").write_text(json.dumps(info["stages"], indent=2) + "\n")
    png = plot_loss(work / "loss.csv", out / "loss.png")
    info["loss_curve"] = png and png.name
    write_card(out, info)
    (work / "result.json").write_text(json.dumps(info, indent=2))
    log(f"shipped {out}: {info}")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanospec_core.train_head", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except NanoSpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

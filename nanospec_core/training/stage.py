"""One stage of head training from the committed corpus: features, training, the held-out comparison, shipping.

    python -m nanospec_core train-head --init assets/heads/qwen2.5-coder-0.5b-instruct/eagle3 \
        --out assets/heads/qwen2.5-coder-0.5b-instruct/eagle3 --work runs/stage3 --extract-minutes 60 --minutes 60

Data: every committed item (corpus.py) outside the held-out rule (split.py), all stages' shards replayed. Features
(the target's aux layers, final hidden and top-8 next-token distribution) are derived data: extracted into
<work>/features_<dtype>/ once, resumably, in a seeded order that mixes the kinds, so a budget cut short still trains
on a balanced share; a later call extends them. Held-out: the committed list's items, each scored on its prompt and
its first `--heldout-answer-tokens` answer tokens, per kind (chat, turn, code, long) and overall, in the target's
dtype and in any other `--score-dtypes` (a head trained on bf16 features may meet float32 ones at decode time;
there without the long-context items, whose prompts are most of the extraction cost).
A stage ships into --out only if it beats the warm-start head on the overall held-out top-1 and expected chain;
otherwise it stays in <work>/head and the log says why.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from ..errors import NanoSpecError
from .trainer import LOSS_WEIGHTS, export, log, make_head, train

KINDS = ("chat", "turn", "code", "long")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded", help="target: 'embedded', a hub id or a local folder")
    parser.add_argument("--out", required=True, help="where the head ships when it beats --init on the held-out list")
    parser.add_argument("--kind", default="eagle3", choices=("eagle3", "eagle2"),
                        help="eagle3: fused low/mid/high features, the target's lm head tied; eagle2: final feature")
    parser.add_argument("--corpus", default=None, help="committed answers (default data/head/<model>)")
    parser.add_argument("--work", default=None, help="features and checkpoints (default runs/head_<kind>_<key>)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--target-dtype", default="auto", help="auto: the fastest measured on this machine at the "
                        "shapes of extraction and training (machine.BULK_ROWS rows, not the decode probe's 1-8)")
    parser.add_argument("--score-dtypes", default="", help="comma list: also score held-out on these features "
                        "(long-context items left out there: their prompts are most of the cost)")
    parser.add_argument("--heldout-answer-tokens", type=int, default=96, help="answer positions per held-out item")
    parser.add_argument("--heldout-per-kind", type=int, default=60, help="held-out items scored per kind (the "
                        "first in corpus order: the same ones every stage)")
    parser.add_argument("--minutes", type=float, default=40.0, help="training budget (this call)")
    parser.add_argument("--end-by", default=None, help="HH:MM (local): shorten training so the run ends by then")
    parser.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: fit --minutes)")
    parser.add_argument("--extract-minutes", type=float, default=60.0, help="budget for new training features")
    parser.add_argument("--levels", type=int, default=3, help="draft levels unrolled in the loss (1 = no TTT)")
    parser.add_argument("--init", default=None, help="head folder to start from (default: random)")
    parser.add_argument("--extract-only", action="store_true", help="stop after the features")
    parser.add_argument("--eval-head", nargs="+", default=None, help="only score these heads on the held-out list")
    parser.add_argument("--train-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="the matmuls' dtype under autocast (float32 master weights either way); auto: the "
                             "target's, which the machine probe measured fastest here at training shapes")
    parser.add_argument("--score-prompts", action="store_true", help="also score the content of user turns (the "
                        "target's distribution over text it reads; template tokens left out)")
    parser.add_argument("--finish-on-answers", type=float, default=0.15, help="fraction of the steps, at the end, "
                        "that train on the target's own answers only (not on text it only read)")
    parser.add_argument("--tokens-per-step", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--negatives", type=int, default=1024, help="random rows added to the sampled softmax")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def held_out_items(corpus: list[dict], held, answer_tokens: int,
                   per_kind: int | None = None) -> list[tuple[str, list[int], list[int]]]:
    """The held-out list's committed items (the first `per_kind` of each kind, in corpus order), cut after
    `answer_tokens` answer positions (the prompt stays whole: it is the context the head drafts in)."""
    items, taken = [], {}
    for item in corpus:
        meta = item["meta"]
        if meta["split"] != "heldout" or not (meta["key"] in held.keys or meta["base"] in held.bases):
            continue
        taken[meta["kind"]] = taken.get(meta["kind"], 0) + 1
        if per_kind is not None and taken[meta["kind"]] > per_kind:
            continue
        answer = item["answer_ids"][:answer_tokens + 1]
        if len(answer) >= 2:
            prompt = item["prompt_ids"]
            items.append((meta["key"], prompt + answer[:-1], [0] * len(prompt) + [1] * (len(answer) - 1)))
    return items


def shown(path: Path) -> str:
    """A path as the card shows it: relative to the repository when inside it (cards travel with the repository)."""
    from ..paths import REPO

    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def mixed_order(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def score(head, sequences: list, kinds: dict[str, str], lm_head_weight: torch.Tensor) -> dict:
    """Held-out agreement per kind and overall (training/loss.evaluate, four levels, every position)."""
    from .loss import combine, evaluate

    parts = {kind: evaluate(head, [s for s in sequences if kinds[s["key"]] == kind], lm_head_weight,
                            max_positions=10 ** 9, levels=4) for kind in KINDS}
    parts = {kind: metrics for kind, metrics in parts.items() if metrics["positions"]}
    return {"all": combine(list(parts.values())), **parts}


def beats(new: dict, old: dict) -> bool:
    return new["top1"] > old["top1"] and new["expected_chain"] > old["expected_chain"]


def user_turn_markers(model: str) -> tuple[list[int], int]:
    """ChatML's user header and end ids, for --score-prompts (corpus.user_spans)."""
    from transformers import AutoTokenizer

    from ..models.loading import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model), local_files_only=True)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if end is None or end == tokenizer.unk_token_id:
        raise NanoSpecError("--score-prompts knows ChatML templates only (<|im_start|>user ... <|im_end|>)")
    return tokenizer.encode("<|im_start|>user\n"), end


def load_target(model: str, device: str, dtype: str):
    from ..machine import BULK_ROWS, choose_runtime
    from ..models.loading import load_model
    from ..models.target import TargetModel
    from ..session import model_config

    runtime = choose_runtime(model_config(model), device=device, dtype=dtype, rows=(BULK_ROWS,))
    loaded = load_model(model, dtype=runtime.torch_dtype, device=runtime.device,
                        layout=(runtime.backbone_layout, runtime.head_layout))
    return runtime, loaded, TargetModel(loaded.hf_model)


def held_out_sequences(target, dtype: str, corpus, held, args, work: Path, aux_layers, kinds: dict | None = None,
                       skip_long: bool = False) -> list:
    """Held-out features in one dtype (cached in <work>/heldout_<dtype>); skip_long leaves out the long-context
    items, whose 1-2k-token prompts are most of the cost (the second dtype's check)."""
    from .data import extract_shards, load_sequences

    items = held_out_items(corpus, held, args.heldout_answer_tokens, args.heldout_per_kind)
    if skip_long:
        items = [item for item in items if kinds[item[0]] != "long"]
    paths = extract_shards(target, items, work / f"heldout_{dtype}", shard_size=16, aux_layers=aux_layers, log=log)
    return load_sequences(paths)


def run(args: argparse.Namespace) -> dict:
    from .card import plot_loss, stage_rows, write_card
    from .corpus import read_corpus, summary, training_items
    from .data import extract_shards, load_sequences
    from .split import HeldOut
    from ..models.eagle import default_aux_layers
    from ..models.eagle_checkpoint import load_head
    from ..paths import head_data

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    begin = time.time()
    runtime, loaded, target = load_target(args.model, args.device, args.target_dtype)
    dtype = str(runtime.torch_dtype).removeprefix("torch.")
    log(f"target runtime: {runtime.describe()}")
    folder = Path(args.corpus or head_data(loaded.key))
    if not (folder / "heldout.json").is_file():
        raise NanoSpecError(f"no committed corpus in {folder} (head-prompts, then nanospec_vllm answers, head-data pack)")
    corpus, held = read_corpus(folder), HeldOut.load(folder / "heldout.json")
    kinds = {item["meta"]["key"]: item["meta"]["kind"] for item in corpus}
    work = Path(args.work or f"runs/head_{args.kind}_{loaded.key}")
    aux = default_aux_layers(target.num_layers)
    lm_head_weight = target.lm_head_weight.detach()

    # 1. The held-out list's features, in the target's dtype and in every other dtype asked for.
    held_seqs = {dtype: held_out_sequences(target, dtype, corpus, held, args, work, aux)}
    for other in [d for d in args.score_dtypes.split(",") if d and d != dtype]:
        _, _, other_target = load_target(args.model, args.device, other)
        held_seqs[other] = held_out_sequences(other_target, other, corpus, held, args, work, aux, kinds, True)
        del other_target

    def score_all(head) -> dict:
        return {d: score(head, seqs, kinds, lm_head_weight.float()) for d, seqs in held_seqs.items()}

    if args.eval_head:  # the same held-out positions for any head: a like-for-like comparison
        results = {name: score_all(load_head(name, target)) for name in args.eval_head}
        print(json.dumps(results, indent=1))
        return results

    # 2. Training features: every committed training item, extracted in a mixed order within the budget.
    prompts = user_turn_markers(args.model) if args.score_prompts else None
    train_items = mixed_order(training_items([i for i in corpus if i["meta"]["split"] == "train"], held.excludes,
                                             prompts), args.seed)
    paths = extract_shards(target, train_items, work / f"features_{dtype}", shard_size=32, aux_layers=aux,
                           deadline=time.time() + args.extract_minutes * 60, log=log)
    if args.extract_only:
        log(f"extract-only: {len(paths)} shards in {work}")
        return {"shards": len(paths)}
    train_seqs = load_sequences(paths, lazy=True)
    scored = [int(s["loss_mask"].sum()) for s in train_seqs]  # one read of each mask (lazy shards: disk)
    n_tokens = sum(scored)
    used = {s["key"] for s in train_seqs}
    data = summary([i for i in corpus if i["meta"]["key"] in used])["train"]
    answers = [n for n, s in enumerate(train_seqs) if kinds[s["key"]] != "read"]
    read_tokens = n_tokens - sum(scored[n] for n in answers)
    log(f"features: {len(train_seqs)} train sequences ({n_tokens} scored tokens, {read_tokens} of them read text) "
        f"of {len(train_items)} committed; {len(held_seqs[dtype])} held out; {data}")

    # 3. Train (fp32 master weights) into <work>/head, exporting a bf16 head at every checkpoint.
    head = make_head(args.kind, target, args.init, args.seed)
    feature_weight, cls_weight = LOSS_WEIGHTS[args.kind]
    trial = work / "head"
    compute = runtime.torch_dtype if args.train_dtype == "auto" else getattr(torch, args.train_dtype)
    info = {"model": loaded.key, "kind": args.kind, "target_dtype": dtype, "machine": runtime.machine,
            "train_dtype": str(compute).removeprefix("torch."),
            "corpus": shown(folder), "data": data, "levels": args.levels, "init": args.init,
            "train_sequences": len(train_seqs), "committed_train_items": len(train_items),
            "train_scored_tokens": n_tokens, "train_scored_read_tokens": read_tokens,
            "score_prompts": args.score_prompts, "finish_on_answers": args.finish_on_answers,
            "loss_weights": {"feature": feature_weight, "cross_entropy": cls_weight},
            "command": "python -m nanospec_core train-head " + " ".join(sys.argv[2:])}

    def on_checkpoint(state):
        export(head, trial, {"training": dict(state)})

    minutes = args.minutes
    if args.end_by:  # leave ~6 minutes for the held-out comparison and the export
        hour, minute = map(int, args.end_by.split(":"))
        end = time.mktime(time.localtime()[:3] + (hour, minute, 0, 0, 0, -1))
        minutes = min(minutes, max(1.0, (end - time.time()) / 60 - 6))
        log(f"training budget: {minutes:.1f} min (ends by {args.end_by})")
    state = train(head, train_seqs, lm_head_weight, work, minutes=minutes, steps=args.steps,
                  tokens_per_step=args.tokens_per_step, lr=args.lr, warmup=args.warmup, negatives=args.negatives,
                  checkpoint_every=args.checkpoint_every, seed=args.seed, levels=args.levels,
                  feature_weight=feature_weight, cls_weight=cls_weight, on_checkpoint=on_checkpoint,
                  compute_dtype=compute, finish_on=answers, finish_fraction=args.finish_on_answers)

    # 4. Held-out: this head against the warm start, same positions; ship only if it is better. Both are scored as
    # they ship: read back from their bf16 checkpoints (the trained copy holds float32 master weights).
    export(head, trial, {"training": dict(state)})
    mine = score_all(load_head(trial, target))
    before = score_all(load_head(args.init, target)) if args.init else None
    info.update({"steps": state["step"], "tokens_seen": state["tokens"], "train_wall_s": round(state["train_s"]),
                 "total_wall_s": round(time.time() - begin), "heldout": mine, "heldout_init": before,
                 "heldout_list": f"{shown(folder / 'heldout.json')} ({len(held.items)} items; scored: the first "
                                 f"{args.heldout_answer_tokens} answer tokens of each)"})
    ships = before is None or beats(mine[dtype]["all"], before[dtype]["all"])
    log(f"held-out ({dtype}): this stage {mine[dtype]['all']}, init {before and before[dtype]['all']}: "
        f"{'ships' if ships else 'does not ship'}")
    out = Path(args.out) if ships else trial
    info["stages"] = stage_rows(Path(args.out), args.init, info, mine[dtype]["all"])
    init = Path(args.init) if args.init else None  # read before the export: --out may be the --init folder
    previous = (init / "MODEL_CARD.md").read_text() if init and (init / "MODEL_CARD.md").is_file() else ""
    acceptance = (init / "acceptance.json").read_text() if ships and init and (init / "acceptance.json").is_file() \
        else None
    export(head, out, {"training": {k: v for k, v in info.items() if k not in ("stages", "heldout_init")}})
    if acceptance:  # the tree chooser's calibration travels with the head until calibrate-head reruns
        (out / "acceptance.json").write_text(acceptance)
    (out / "stages.json").write_text(json.dumps(info["stages"], indent=2) + "\n")
    png = plot_loss(work / "loss.csv", out / "loss.png")
    info["loss_curve"] = png and png.name
    write_card(out, info, previous=previous)
    (work / "result.json").write_text(json.dumps(info, indent=2))
    log(f"{'shipped' if ships else 'kept'} {out}")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanospec_core.training.stage", description=__doc__.split("\n")[0])
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

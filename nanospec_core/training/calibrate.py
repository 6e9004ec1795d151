"""Measure a draft head's acceptance per depth and store it with the head: the input of the tree chooser.

    python -m nanospec_core calibrate-head --model embedded          # writes acceptance.json beside the head

For prompts the head was not trained on, the target writes its greedy answer (the text drafts are verified
against); one target forward over prompt + answer gives its features and greedy tokens at every position; the head
then drafts from every answer position with the chain teacher-forced (train_loss.unrolled: level r reads its own
level r-1 output, with the drafting visibility). ranks[p][d-1] = rank of the target's greedy token among the
head's depth-d logits (0 = its first guess), capped at RANK_CAP. decoding/tree_choice.py turns these into expected
tokens per round for any tree.

Prompts: ShareGPT first user turns from the allowed range (records below 8,000) whose conversation no head trained
on, and (--long-share, 0.3 by default, about Spec-Bench's share of summarisation, RAG, extraction and translation)
long-context tasks over those conversations' text (calibration_prompts): first turns alone made the tree chooser's
tau about 20% optimistic on the benchmark. Never Spec-Bench, never the evaluation range: acceptance.json ships with
the head. (The shipped acceptance.json files name their command; stage 2's was measured on evaluation-range records,
before this rule; stage 3's and later on allowed ones.)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

RANK_CAP = 16  # ranks at or past this are stored as RANK_CAP (no tree is that wide)
# (count, seed, pool) of every ShareGPT draw a shipped head trained on (their MODEL_CARD.md): EAGLE-2's two stages,
# EAGLE-3's generated answers (train-head --generate) and its ShareGPT text (--sharegpt, seed + 1).
TRAINING_DRAWS = ((300, 0, 12000), (1400, 0, 12000), (2400, 0, 8000), (1200, 1, 8000))


def calibration_prompts(count: int, seed: int = 1, corpus: Path | None = None, long_share: float = 0.0) -> list[str]:
    """First turns of ShareGPT records below SHAREGPT_EVAL_FROM that no head trained on: every draw in
    TRAINING_DRAWS and every conversation in the committed corpus (`corpus`: data/head/<model>, by base id, any
    split) are left out. acceptance.json ships with the head and steers the tree chooser, so it is built from
    allowed records only, like the head and the frequency table; the evaluation range stays for evaluation.
    long_share: that share of the prompts are long-context tasks instead (summarise, extract, answer from or
    translate a 3-7k-character passage of such a conversation, sources.long_task), as in the benchmark's mix."""
    from .corpus import read_manifest
    from .data import SHAREGPT_EVAL_FROM, sample_conversations
    from .split import base_of, norm_hash

    drawn = [(key, messages) for count, draw_seed, pool in TRAINING_DRAWS
             for key, messages in sample_conversations(count, skip_ids=set(), seed=draw_seed, pool=pool)]
    manifest = read_manifest(corpus) if corpus and Path(corpus).is_dir() else []
    used = {line["base"] for line in manifest} | {base_of("sharegpt", key) for key, _ in drawn}
    # the same first turn under another id ("hi", a pasted template) counts as seen
    seen = {line["norm"] for line in manifest} | {norm_hash(messages[0]["content"]) for _, messages in drawn}
    candidates = sample_conversations(8 * count, skip_ids={key for key, _ in drawn}, seed=seed,
                                      pool=SHAREGPT_EVAL_FROM)
    unused = [messages for key, messages in candidates
              if base_of("sharegpt", key) not in used and norm_hash(messages[0]["content"]) not in seen]
    n_long = round(count * long_share)
    prompts = [messages[0]["content"] for messages in unused[:count - n_long]]
    return prompts + long_prompts(unused[count - n_long:], n_long, seed)


def long_prompts(conversations: list[list[dict]], count: int, seed: int) -> list[str]:
    """Long-context tasks over passages of these (unused) conversations' own text, both speakers; only those whose
    first turn has 200 characters or more (a passage that opens with "hi" says little and names no conversation)."""
    import random

    from .sources import long_task, passages_of

    rng, out = random.Random(seed), []
    for messages in conversations:
        windows = passages_of("\n\n".join(m["content"] for m in messages), 3000, 7000)
        if windows and len(out) < count and len(messages[0]["content"]) >= 200:
            out.append(long_task(rng, windows[0])[1])
    return out


@torch.inference_mode()
def head_ranks(target, head, ids: torch.Tensor, answer_start: int, depth: int) -> np.ndarray:
    """[positions, depth] ranks of the target's greedy token along teacher-forced draft chains (module docstring).

    Rows are chains starting at answer positions whose `depth` next tokens are all the target's greedy ones.
    """
    from .loss import unrolled

    T = ids.shape[0]
    out = target.forward(ids, target.new_cache(T), aux_layers=head.aux_layers)
    greedy = torch.cat([target.logits(out.hidden[i:i + 256]).argmax(-1) for i in range(0, T, 256)])  # [T]
    features = head.target_features(out)[:-1]
    start, end = answer_start, T - depth - 1  # chains that start in the answer and fit `depth` levels
    if end <= start:
        return np.zeros((0, depth), dtype=np.int64)
    # level r row i (chain j = start + i) predicts the token after position j + r
    preds = unrolled(head, ids, features, depth, torch.arange(start, end))
    rows = end - start
    ranks = torch.zeros(rows, depth, dtype=torch.long)
    follows = torch.ones(rows, dtype=torch.bool)
    weight = head.lm_head_weight
    for level, pred in enumerate(preds, start=1):
        logits = (head.lm_input(pred).to(weight.dtype) @ weight.T).float()  # [rows, Vh]
        truth = greedy[start + level:end + level]
        if head.head_to_target is not None:  # EAGLE-3: target id -> head row (-1: not draftable, rank = cap)
            from ..vocab.policies import _target_to_head

            row_of = _target_to_head(head.head_to_target, target.vocab_size)[truth]
            true_logit = logits.gather(1, row_of.clamp(min=0)[:, None])
            rank = (logits > true_logit).sum(-1).masked_fill(row_of < 0, RANK_CAP)
        else:
            rank = (logits > logits.gather(1, truth[:, None])).sum(-1)
        ranks[:, level - 1] = rank.clamp(max=RANK_CAP)
        if level > 1:  # the chain is fed the text's token: it must be the target's greedy one
            follows &= ids[start + level:end + level] == greedy[start + level - 1:end + level - 1]
    return ranks[follows].numpy()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=24,
                        help="ShareGPT first turns below record 8,000 that no head trained on")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="greedy answer length per prompt")
    parser.add_argument("--depth", type=int, default=8, help="draft levels measured")
    parser.add_argument("--out", default=None, help="head folder to write acceptance.json into (default: the head's)")
    parser.add_argument("--long-share", type=float, default=0.3, help="share of long-context tasks (summarise, "
                        "extract, answer, translate a passage; up to --max-prompt-tokens), as in Spec-Bench's mix")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048)


def run(args) -> int:
    import sys

    from tqdm.auto import tqdm

    from ..config import GenerationConfig
    from ..decoding.tree_choice import save_acceptance
    from ..paths import head_data, shipped_head_dir
    from ..session import Session

    session = Session(args.model, dtype=args.dtype, device=args.device, head=args.head)
    session.head  # loads it, and so resolves --head (a folder, a shipped kind, or the default)
    out = Path(args.out) if args.out else session.head_dir or shipped_head_dir(session.loaded.key)
    started = time.time()
    parts = []
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    allowed = calibration_prompts(args.prompts, corpus=head_data(session.loaded.key), long_share=args.long_share)
    prompts = [ids for ids in map(session.encode, allowed) if ids.numel() <= args.max_prompt_tokens]
    for prompt_ids in tqdm(prompts, desc="calibrate", unit="prompt"):
        answer = session.run("nanospec", prompt_ids, gen).token_ids  # greedy: the target's own answer
        ids = torch.cat([prompt_ids, torch.tensor(answer, dtype=torch.long)]).to(session.target.device)
        parts.append(head_ranks(session.target, session.head, ids, prompt_ids.numel() - 1, args.depth))
    ranks = np.concatenate(parts)
    info = {"command": "python -m nanospec_core calibrate-head " + " ".join(sys.argv[2:]),
            "dtype": session.runtime.dtype, "machine": session.runtime.machine, "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens, "rank_cap": RANK_CAP,
            "source": f"ShareGPT records below 8,000 that no head trained on: first turns, and long-context tasks "
                      f"over their text (share {args.long_share})", "max_prompt_tokens": args.max_prompt_tokens,
            "wall_s": round(time.time() - started)}
    path = save_acceptance(out, ranks, info)
    summary = json.loads(path.read_text())["summary"]
    print(f"{path}: {ranks.shape[0]} positions, depth {ranks.shape[1]}; top-1 per depth given the chain: "
          + ", ".join(f"{value:.3f}" for value in summary.values()))
    return 0

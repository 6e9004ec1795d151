"""Prompts out to a serving engine, its answers back into the committed corpus (corpus.py).

Generating with transformers while capturing every layer's states (an earlier path, removed) ran at 31-40 new tokens/s
on the 2-core Zen 4; vLLM's CPU build decodes the same target at 134-169 new tokens/s with 128 requests in flight
(docs/results.md). So a stage splits the work: vLLM writes the answers' token ids (`nanospec_vllm answers`), they
are packed into committed shards as each chunk ends, and one forward pass of our own target adds the features
wherever a stage trains (data.extract_shards), in the dtype the machine probe chose.

    python -m nanospec_core head-prompts --out runs/stage3/prompts.jsonl      # held-out list + training mix
    .venv-vllm/bin/python -m nanospec_vllm answers --model <target folder> \
        --prompts runs/stage3/prompts.jsonl --out runs/stage3/answers.jsonl --minutes 120
    python -m nanospec_core head-data pack --answers runs/stage3/answers.jsonl   # -> data/head/<model>/shards
    python -m nanospec_core head-prompts --out runs/stage3/turns.jsonl --turns   # next user turns of answered chats

Files (JSON lines, appended to, so every step resumes):
  prompts: {"key", "prompt_ids", "temperature", "meta": {source, kind, record, base, norm, turn, split, ...}}
  answers: the prompt record plus "answer_ids" (ending at the stop id), "engine" and "dtype"
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .corpus import read_manifest
from .split import HeldOut

HELD_OUT_COUNTS = {"chat": 120, "long_sharegpt": 30, "long_doc": 20, "code": 40}
TRAIN_COUNTS = {"chat": 2400, "long_sharegpt": 450, "long_doc": 250, "code": 700}


def unique(items: list[dict], count: int, seed: int, taken_norms: set[str] | None = None) -> list[dict]:
    """Up to `count` items, at most one per base and per normalised prompt, in a seeded random order."""
    items = list(items)
    random.Random(seed).shuffle(items)
    bases, norms, out = set(), set(taken_norms or ()), []
    for item in items:
        meta = item["meta"]
        if meta["base"] in bases or meta["norm"] in norms:
            continue
        bases.add(meta["base"])
        norms.add(meta["norm"])
        out.append(item)
        if len(out) >= count:
            break
    return out


def held_out_items(tokenizer, counts: dict = HELD_OUT_COUNTS, seed: int = 3) -> list[dict]:
    """The held-out prompts: ShareGPT records from SHAREGPT_EVAL_FROM on (bases that never occur before it), code
    files and packages in the held-out bucket."""
    from . import sources
    from .data import SHAREGPT_EVAL_FROM
    from .split import base_of

    train_bases = {base_of("sharegpt", r["id"]) for _, r in sources.sharegpt_records(0, SHAREGPT_EVAL_FROM)}
    late = [(n, r) for n, r in sources.sharegpt_records(SHAREGPT_EVAL_FROM, None)
            if base_of("sharegpt", r["id"]) not in train_bases]
    chat = unique(sources.chat_items(tokenizer, late, "heldout"), counts["chat"], seed)
    long_chat = sources.sharegpt_long_items(tokenizer, late, "heldout", counts["long_sharegpt"] * 2, seed)
    long_chat = unique([i for i in long_chat if i["meta"]["base"] not in {c["meta"]["base"] for c in chat}],
                       counts["long_sharegpt"], seed)
    docs = sources.doc_long_items(tokenizer, True, counts["long_doc"], seed)
    code = unique(sources.code_items(tokenizer, True, counts["code"] * 2, seed), counts["code"], seed)
    return chat + long_chat + docs + code


def training_items(tokenizer, held: HeldOut, committed: set[str], counts: dict = TRAIN_COUNTS,
                   seed: int = 3) -> list[dict]:
    """The training mix, from records before SHAREGPT_EVAL_FROM and code/doc bases outside the held-out bucket;
    none shares a base or a normalised prompt with the held-out list, none is committed already."""
    from . import sources
    from .data import SHAREGPT_EVAL_FROM

    early = list(sources.sharegpt_records(0, SHAREGPT_EVAL_FROM))
    rng = random.Random(seed)
    chat = sources.chat_items(tokenizer, early, "train")
    rng.shuffle(chat)
    mixed = chat[:counts["chat"]]
    mixed += sources.sharegpt_long_items(tokenizer, early, "train", counts["long_sharegpt"], seed)
    mixed += sources.doc_long_items(tokenizer, False, counts["long_doc"], seed)
    mixed += sources.code_items(tokenizer, False, counts["code"], seed)
    rng.shuffle(mixed)
    return [item for item in mixed if not held.excludes(item["meta"]) and item["key"] not in committed]


def write_stage_prompts(tokenizer, folder: Path, out: Path, counts: dict = TRAIN_COUNTS, seed: int = 3) -> dict:
    """Held-out prompts (building the committed list the first time), then the training mix, into `out`.
    Items already committed are left out, so a later stage asks only for what is new."""
    held_path = Path(folder) / "heldout.json"
    if held_path.is_file():
        held = HeldOut.load(held_path)
        held_prompts = [item for item in held_out_items(tokenizer, seed=seed) if item["key"] in held.keys]
    else:
        held_prompts = held_out_items(tokenizer, seed=seed)
        held = HeldOut([item["meta"] for item in held_prompts])
        held.save(held_path, "Fixed held-out list (training/split.py): every stage is scored on these items' "
                             "committed answers; no training item shares a base or a normalised prompt with one.")
    committed = {meta["key"] for meta in read_manifest(folder)}
    todo = [item for item in held_prompts if item["key"] not in committed]
    held_todo = len(todo)
    todo += training_items(tokenizer, held, committed, counts, seed)
    write_records(out, todo)
    return {"heldout": len(held.items), "heldout_to_answer": held_todo, "prompts": len(todo)}


def write_turn_prompts(tokenizer, folder: Path, out: Path, max_turn: int = 3) -> int:
    """The next user turn of every committed conversation that has one (sources.turn_items)."""
    from . import sources
    from .corpus import read_corpus

    answered = {item["meta"]["key"]: item for item in read_corpus(folder)}
    ids = {item["meta"]["record"].split(":", 1)[1] for item in answered.values()
           if item["meta"]["kind"] in ("chat", "turn")}
    conversations = {r["id"]: r for _, r in sources.sharegpt_records(0, None) if r["id"] in ids}
    items = sources.turn_items(tokenizer, answered, conversations, max_turn=max_turn)
    write_records(out, items)
    return len(items)


def write_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("w") as sink:
        for record in records:
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")

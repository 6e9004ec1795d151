"""The committed head-training corpus: the target's own answers as compact token-id shards, with a manifest.

Features (the target's hidden states) cost ~4.5 ms a token to recompute and take ~6 KB a token; the answers cost
~6 ms a token to generate and take ~2 bytes a token compressed. So what lasts is the answers, committed to the
repository as each chunk ends, and features are derived again wherever a stage trains (data.extract_shards).

Layout, data/head/<model>/ (paths.head_data):
  heldout.json                    the fixed held-out list (split.py), written once
  shards/answers_NNNNN.npz        tokens [N] uint32 (each item's prompt then answer ids, concatenated),
                                  offsets [S + 1] int64, prompt_lens [S] int32  (numpy, compressed)
  shards/answers_NNNNN.jsonl      one manifest line per item, in shard order: key, source, kind, record, base,
                                  norm, turn, task, sampler, split, prompt_sha (of its prompt ids), prompt_tokens,
                                  answer_tokens, finished (ended on a stop id), engine, dtype
Each shard is written to temporary names and renamed (the .jsonl last), so a killed writer leaves whole shards only,
and a shard without its manifest is ignored. Stages add shards; training reads all of them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import NanoSpecError
from .split import prompt_sha


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a killed writer) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def shard_paths(folder: Path) -> list[Path]:
    """Manifests of complete shards, in order."""
    return sorted((Path(folder) / "shards").glob("answers_*.jsonl"))


def read_manifest(folder: Path) -> list[dict]:
    lines = []
    for path in shard_paths(folder):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines


def read_corpus(folder: Path, check: bool = True) -> list[dict]:
    """Every committed item: {"meta": manifest line, "prompt_ids", "answer_ids"}; `check` verifies prompt_sha."""
    items = []
    for manifest in shard_paths(folder):
        arrays = np.load(manifest.with_suffix(".npz"))
        tokens, offsets, prompt_lens = arrays["tokens"], arrays["offsets"], arrays["prompt_lens"]
        metas = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        if len(metas) != len(prompt_lens):
            raise NanoSpecError(f"{manifest}: {len(metas)} manifest lines for {len(prompt_lens)} items")
        for n, meta in enumerate(metas):
            ids = tokens[offsets[n]:offsets[n + 1]].astype(np.int64).tolist()
            prompt, answer = ids[:prompt_lens[n]], ids[prompt_lens[n]:]
            if check and prompt_sha(prompt) != meta["prompt_sha"]:
                raise NanoSpecError(f"{manifest.name}: item {meta['key']} does not match its prompt hash")
            items.append({"meta": meta, "prompt_ids": prompt, "answer_ids": answer})
    return items


def write_shard(folder: Path, records: list[dict], engine: str, dtype: str, stop_ids: set[int]) -> Path:
    """records ({key, prompt_ids, answer_ids, meta}) -> the next answers_NNNNN.npz + .jsonl in folder/shards."""
    shards = Path(folder) / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    number = len(shard_paths(folder))
    stem = shards / f"answers_{number:05d}"
    tokens, offsets, prompt_lens, lines = [], [0], [], []
    for record in records:
        prompt, answer = record["prompt_ids"], record["answer_ids"]
        tokens += prompt + answer
        offsets.append(len(tokens))
        prompt_lens.append(len(prompt))
        meta = {**record["meta"], "key": record["key"], "prompt_sha": prompt_sha(prompt),
                "prompt_tokens": len(prompt), "answer_tokens": len(answer),
                "finished": bool(answer) and answer[-1] in stop_ids,
                "engine": record.get("engine", engine), "dtype": record.get("dtype", dtype)}
        lines.append(json.dumps(meta, ensure_ascii=False))
    if max(tokens, default=0) >= 2 ** 32:
        raise NanoSpecError("token id beyond uint32")
    tmp = stem.with_name(stem.name + ".tmp.npz")
    np.savez_compressed(tmp, tokens=np.asarray(tokens, dtype=np.uint32), offsets=np.asarray(offsets, dtype=np.int64),
                        prompt_lens=np.asarray(prompt_lens, dtype=np.int32))
    tmp.replace(stem.with_suffix(".npz"))
    tmp_manifest = stem.with_suffix(".jsonl.tmp")
    tmp_manifest.write_text("\n".join(lines) + "\n")
    tmp_manifest.replace(stem.with_suffix(".jsonl"))
    return stem.with_suffix(".jsonl")


def pack_answers(answers: Path, folder: Path, engine: str, dtype: str, stop_ids: set[int],
                 min_items: int = 1) -> tuple[Path | None, int]:
    """New answers from an engine's answers file (training/answers.py format, `meta` included) -> one new shard.
    Keys already committed are skipped. Returns (manifest path or None, items written)."""
    if not Path(answers).is_file():  # the engine has not finished its first chunk yet
        return None, 0
    done = {meta["key"] for meta in read_manifest(folder)}
    fresh, seen = [], set()
    for record in read_jsonl(Path(answers)):
        if record["key"] in done or record["key"] in seen or "meta" not in record:
            continue
        seen.add(record["key"])
        fresh.append(record)
    if len(fresh) < min_items:
        return None, 0
    return write_shard(folder, fresh, engine, dtype, stop_ids), len(fresh)


def training_items(corpus: list[dict], excluded, score_prompts: tuple[list[int], int] | None = None
                   ) -> list[tuple[str, list[int], list[int]]]:
    """Committed items -> data.extract_shards items (key, ids, loss_mask) for training: prompt + answer without its
    last token, loss 1 on answer positions (on a read item only its meta.scored spans: the assistant turns).
    excluded(meta) -> True drops an item (the held-out rule). score_prompts (user header ids, end id): also score
    the content of every user turn (user_spans), the template tokens around it left out."""
    items = []
    for item in corpus:
        if excluded(item["meta"]) or len(item["answer_ids"]) < 2:
            continue
        prompt, answer = item["prompt_ids"], item["answer_ids"]
        mask = [0] * len(prompt) + answer_mask(item["meta"], len(answer))
        ids = prompt + answer
        if score_prompts:
            for start, end in user_spans(ids, *score_prompts):
                mask[start:end] = [1] * (end - start)
        items.append((item["meta"]["key"], ids[:-1], mask[:-1]))
    return items


def answer_mask(meta: dict, length: int) -> list[int]:
    """1 on the answer positions that carry a loss: all of them, or each of meta.scored's [start, end) spans but its
    last token. Position t's label is the target's distribution of token t + 1, so an answer scores the tokens after
    its first, its stop token included, and a span does the same (the token after a span is the template's)."""
    if "scored" not in meta:
        return [1] * length
    mask = [0] * length
    for start, end in meta["scored"]:
        mask[start:end - 1] = [1] * (end - 1 - start)
    return mask


def user_spans(ids: list[int], header: list[int], end_id: int) -> list[tuple[int, int]]:
    """[start, end) of each user turn's content in a templated sequence: after each occurrence of the user header
    (ChatML: <|im_start|>user\\n) up to its end token, which stays out (so do the header's own tokens)."""
    spans, n, width = [], 0, len(header)
    while n + width <= len(ids):
        if ids[n:n + width] != header:
            n += 1
            continue
        start = end = n + width
        while end < len(ids) and ids[end] != end_id:
            end += 1
        spans.append((start, end))
        n = end
    return spans


def summary(corpus: list[dict]) -> dict:
    """Items and answer tokens, per split and kind (the model card's data row)."""
    out: dict = {}
    for item in corpus:
        meta = item["meta"]
        row = out.setdefault(meta["split"], {}).setdefault(meta["kind"], {"items": 0, "answer_tokens": 0})
        row["items"] += 1
        row["answer_tokens"] += meta["answer_tokens"]
    return out

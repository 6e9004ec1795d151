"""Text the target only reads: original text scored by the target's prefill, no answer generated (kind 'read').

The head's loss distils the target's own next-token distribution (its top-k at every scored position, data.py), so
the labels come from one forward of the target over any text: what the text says next is only the context, the
target's distribution there is the label. That makes allowed original text as cheap as features (~2 ms a token
here) where the target's own answers cost ~6 ms more to generate. Original text is placed inside the assistant
turn, so the head learns in the template it drafts in:
  sharegpt  a conversation of ShareGPT records below data.SHAREGPT_EVAL_FROM, as written (both speakers), through
            the chat template; the assistant turns (content and the closing stop token) are scored, the user turns
            and the template tokens between them are context only.
  code      a Python module of the installed packages (held-out bucket and vLLM's source left out), as the answer
            to "Show the source of <path>." in a fenced block.
  doc       a package's documentation (its METADATA long description) as the answer to "Write the README of the
            Python package <name>." (held-out bucket left out).

Items use the committed corpus' format (corpus.py) with kind 'read', sampler 'original' and engine 'none
(original text)'; meta.scored lists the [start, end) spans of answer_ids that carry a loss (absent: all of it).
"""
from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from .sources import template
from .split import base_of, held_out_bucket, norm_hash

ENGINE = "none (original text)"
SAMPLER = "original"
CODE_ASK = "Show the source of `{path}`."
DOC_ASK = "Write the README of the Python package {name}."


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], list[list[int]]]:
    """A conversation (user first, alternating) -> (prompt_ids, answer_ids, scored spans of answer_ids).

    prompt_ids: the template up to the first assistant turn's header (what an engine would be prompted with);
    answer_ids: the rest of the templated conversation. Each assistant turn i's content starts where the template
    of messages[:i] with a generation prompt ends, and runs to the last stop token of the template of
    messages[:i + 1] (its closing <|im_end|> included, the newline after it not: the target stops there)."""
    prompt = template(tokenizer, messages[:1])
    full = template_all(tokenizer, messages)
    if full[:len(prompt)] != prompt:
        raise ValueError("the chat template does not extend its prompt (a conversation cannot be cut into spans)")
    stop = stop_ids(tokenizer)
    spans = []
    for turn in range(1, len(messages), 2):
        start = len(template(tokenizer, messages[:turn]))
        segment = template_all(tokenizer, messages[:turn + 1])
        if segment != full[:len(segment)]:
            raise ValueError("the chat template renders a turn differently once later turns follow")
        end = max((n + 1 for n in range(start, len(segment)) if segment[n] in stop), default=len(segment))
        spans.append([start - len(prompt), end - len(prompt)])
    return prompt, full[len(prompt):], spans


def stop_ids(tokenizer) -> set[int]:
    """The ids that end an assistant turn: the tokenizer's eos and ChatML's <|im_end|> where it has one."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return {tokenizer.eos_token_id} | ({end} if end is not None and end != tokenizer.unk_token_id else set())


def template_all(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def fit_turns(tokenizer, messages: list[dict], max_tokens: int) -> list[dict] | None:
    """The longest prefix of whole user/assistant pairs whose template fits max_tokens (None if not even one).
    A too-long first answer is cut at a line boundary instead, so long answers still contribute their start."""
    for pairs in range(len(messages) // 2, 0, -1):
        if len(template_all(tokenizer, messages[:2 * pairs])) <= max_tokens:
            return messages[:2 * pairs]
    first, answer = messages[0], messages[1]["content"]
    budget = max_tokens - len(template(tokenizer, [first])) - 2
    if budget < 64:
        return None
    ids = tokenizer.encode(answer)[:budget]
    cut = tokenizer.decode(ids).rsplit("\n", 1)[0]
    return [first, {"role": "assistant", "content": cut}] if len(cut) > 200 else None


def read_item(tokenizer, messages: list[dict], meta: dict, max_tokens: int) -> dict | None:
    """One corpus record ({key, prompt_ids, answer_ids, meta}) of original text, or None if it does not fit."""
    messages = fit_turns(tokenizer, messages, max_tokens)
    if messages is None:
        return None
    prompt, answer, spans = assistant_spans(tokenizer, messages)
    if sum(b - a for a, b in spans) < 16:
        return None
    meta = {**meta, "kind": "read", "sampler": SAMPLER, "turn": 0, "norm": norm_hash(messages[0]["content"]),
            "scored": spans}
    return {"key": meta["key"], "prompt_ids": prompt, "answer_ids": answer, "meta": meta, "engine": ENGINE,
            "dtype": "-"}


def sharegpt_read_items(tokenizer, records, excluded, count: int, max_tokens: int = 2048,
                        max_turns: int = 12) -> list[dict]:
    """ShareGPT conversations as written (records: (position, record) below SHAREGPT_EVAL_FROM)."""
    from .data import SHAREGPT_EVAL_FROM, to_messages

    items = []
    for position, record in records:
        if len(items) >= count:
            break
        if position >= SHAREGPT_EVAL_FROM:
            raise ValueError(f"ShareGPT record {position} is evaluation-only")
        messages = to_messages(record, max_turns=max_turns)
        if messages is None:
            continue
        meta = {"key": f"read:sharegpt:{record['id']}", "source": "sharegpt", "task": "conversation",
                "record": f"{position}:{record['id']}", "base": base_of("sharegpt", record["id"]), "split": "train"}
        item = read_item(tokenizer, messages, meta, max_tokens)
        if item and not excluded(item["meta"]):
            items.append(item)
    return items


def package_files(seed: int) -> list[tuple[str, Path]]:
    """(record, path) of the main interpreter's installed Python modules, shuffled; tests and vendored code left out.
    (Held-out code is vLLM's own source, which lives only in the plugin's venv: never here.)"""
    root = Path(sysconfig.get_paths()["purelib"])
    skip = ("test", "tests", "__pycache__", "_vendor", "vendored", "vllm")
    files = sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))
    random.Random(seed).shuffle(files)
    return [(f"site/{path.relative_to(root)}", path) for path in files]


def module_texts(seed: int):
    """(meta, user turn, original answer) of installed Python modules, outside the held-out bucket."""
    for record, path in package_files(seed):
        base = base_of("code", f"{record}:module")
        if held_out_bucket(base):
            continue
        try:
            source = path.read_text(encoding="utf-8").strip()
        except (UnicodeDecodeError, OSError):
            continue
        if 400 <= len(source) <= 60000:
            meta = {"key": f"read:code:{record}", "source": "code", "task": "module", "record": f"{record}:module",
                    "base": base}
            yield meta, CODE_ASK.format(path=record.removeprefix("site/")), f"```python\n{source}\n```"


def doc_texts(seed: int):
    """(meta, user turn, original answer) of installed packages' documentation, outside the held-out bucket."""
    from .sources import package_docs

    docs = package_docs()
    random.Random(seed).shuffle(docs)
    for name, body in docs:
        base = base_of("doc", name)
        if not held_out_bucket(base):
            meta = {"key": f"read:doc:{name}", "source": "doc", "task": "readme", "record": f"{name}:METADATA",
                    "base": base}
            yield meta, DOC_ASK.format(name=name), body.strip()


def answered_items(tokenizer, texts, excluded, count: int, max_tokens: int = 2048) -> list[dict]:
    """Up to `count` read items from (meta, user turn, original answer) triples (module_texts, doc_texts)."""
    items = []
    for meta, ask, answer in texts:
        if len(items) >= count:
            break
        messages = [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
        item = read_item(tokenizer, messages, {**meta, "split": "train"}, max_tokens)
        if item and not excluded(item["meta"]):
            items.append(item)
    return items


def add_read_shards(tokenizer, folder: Path, sharegpt: int, code: int, docs: int, seed: int = 0,
                    shard_items: int = 500, log=print) -> int:
    """Up to sharegpt/code/docs new read items (keys not yet committed), packed into new shards of folder."""
    from .corpus import read_manifest, write_shard
    from .sources import sharegpt_records
    from .split import HeldOut
    from .data import SHAREGPT_EVAL_FROM

    held = HeldOut.load(Path(folder) / "heldout.json")
    done = {meta["key"] for meta in read_manifest(folder)}
    have = {kind: sum(k.startswith(f"read:{kind}:") for k in done) for kind in ("sharegpt", "code", "doc")}

    def fresh(meta: dict) -> bool:
        return meta["key"] in done or held.excludes(meta)

    records = [(p, r) for p, r in sharegpt_records(0, SHAREGPT_EVAL_FROM)]
    random.Random(seed).shuffle(records)
    items = sharegpt_read_items(tokenizer, records, fresh, max(0, sharegpt - have["sharegpt"]))
    items += answered_items(tokenizer, module_texts(seed), fresh, max(0, code - have["code"]))
    items += answered_items(tokenizer, doc_texts(seed), fresh, max(0, docs - have["doc"]))
    random.Random(seed + 1).shuffle(items)
    for start in range(0, len(items), shard_items):
        path = write_shard(folder, items[start:start + shard_items], ENGINE, "-", stop_ids(tokenizer))
        log(f"{path}: {len(items[start:start + shard_items])} read items")
    return len(items)

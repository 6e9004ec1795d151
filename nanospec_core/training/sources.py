"""Prompts for the target to answer, with their provenance: what a stage of head data is made of.

Four kinds, so the data looks like what the head drafts in the benchmark, long contexts included:
  chat    ShareGPT first user turns (the standard EAGLE source).
  turn    a later user turn of the same conversation, with the target's *own* earlier answers as the assistant turns
          (built from committed answers, so a stage answers turn 1 before turn 2 exists).
  code    completion prompts cut from Python source: a function's signature and docstring, the standard library's and
          the installed packages' (the target is a coder model).
  long    tasks over a passage of 1-2k tokens: summarise, translate, extract, answer from the passage (Spec-Bench's
          weakest categories). Passages: ShareGPT turns, and the documentation installed packages carry (their
          METADATA long description).

Every item carries `meta`: source ('sharegpt' | 'code' | 'doc'), kind, record (ShareGPT position and id, or
file:function, or package:file), base and norm (split.py), turn, task, sampler. Training items come from ShareGPT
records before data.SHAREGPT_EVAL_FROM and from code/doc bases outside the held-out bucket; held-out items from
records at or after it (evaluation-only, so no head trained on them) and from the held-out bucket.
"""
from __future__ import annotations

import ast
import random
import sysconfig
import zlib
from pathlib import Path

from .split import base_of, held_out_bucket, norm_hash

SUMMARISE = ["Summarize the following text.\n\n{p}", "Summarize: {p}",
             "Write a short summary of this passage in three or four sentences.\n\n{p}",
             "Give the key points of the text below as a bulleted list.\n\n{p}"]
TRANSLATE = ["Translate the following text into {lang}.\n\n{p}", "Translate {src} to {lang}: {p}"]
EXTRACT = ["Extract every {thing} mentioned in the text below and return them as a JSON list.\n\n{p}",
           "List all {thing} that appear in the following passage, one per line, each with a short note.\n\n{p}",
           "From the passage below, build a markdown table of the {thing} it names and what it says about each."
           "\n\n{p}"]
THINGS = ["names of people, products or organisations", "numbers and dates", "technical terms",
          "functions, classes and options", "steps or instructions"]
QUESTIONS = ["What is the main point of the passage?", "What problem does it describe, and what does it propose?",
             "Which steps does it describe, in order?", "What requirements, conditions or limits does it mention?",
             "Who is this text written for, and what should they take away from it?"]
ANSWER_FROM = ["Read the passage and answer the question.\n\nPassage:\n{p}\n\nQuestion: {q}",
               "{p}\n\nBased only on the text above: {q}"]
LANGS = ["French", "German", "Spanish", "Chinese"]
CODE_ASK = "Complete the following Python code. Reply with the code only.\n\n```python\n{snippet}\n```"


def sampler_of(key: str, held_out: bool) -> tuple[str, float]:
    """Held-out items are greedy (the benchmark's mode); 1 in 3 training items is sampled at T 0.7 (diversity)."""
    if held_out or zlib.crc32(key.encode()) % 3:
        return "greedy", 0.0
    return "t0.7", 0.7


def template(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def make_item(tokenizer, messages: list[dict], meta: dict, max_prompt: int, min_prompt: int = 1) -> dict | None:
    """A prompt record ({key, prompt_ids, temperature, meta}) or None when its templated length is out of range."""
    ids = template(tokenizer, messages)
    if not min_prompt <= len(ids) <= max_prompt:
        return None
    held = meta["split"] == "heldout"
    sampler, temperature = sampler_of(meta["key"], held)
    key = f"{meta['key']}#{sampler}"
    return {"key": key, "prompt_ids": ids, "temperature": temperature,
            "meta": {**meta, "key": key, "sampler": sampler, "prompt_tokens": len(ids)}}


def sharegpt_records(start: int, stop: int | None):
    """(position, record) of ShareGPT records start..stop-1 (None: to the end)."""
    from .data import iter_sharegpt

    for position, record in enumerate(iter_sharegpt()):
        if stop is not None and position >= stop:
            return
        if position >= start:
            yield position, record


def chat_items(tokenizer, records, split: str, max_prompt: int = 1536) -> list[dict]:
    """First user turns (meta.turn 0)."""
    from .data import to_messages

    items = []
    for position, record in records:
        messages = to_messages(record, max_turns=2)
        if messages is None or len(messages[0]["content"]) > 6000:
            continue
        meta = {"key": f"sharegpt:{record['id']}:t0", "source": "sharegpt", "kind": "chat", "turn": 0,
                "record": f"{position}:{record['id']}", "base": base_of("sharegpt", record["id"]),
                "norm": norm_hash(messages[0]["content"]), "split": split}
        item = make_item(tokenizer, messages[:1], meta, max_prompt)
        if item:
            items.append(item)
    return items


def passages_of(text: str, low: int, high: int) -> list[str]:
    """Windows of `low`..`high` characters at paragraph boundaries."""
    out, current = [], ""
    for paragraph in text.split("\n\n"):
        if len(current) + len(paragraph) > high and len(current) >= low:
            out.append(current.strip())
            current = ""
        current += paragraph + "\n\n"
    if low <= len(current.strip()) <= high:
        out.append(current.strip())
    return [p for p in out if len(p) <= high]


def long_task(rng: random.Random, passage: str) -> tuple[str, str]:
    """(task, user text) for one passage."""
    task = rng.choice(["summarize", "summarize", "extract", "qa", "qa", "translate"])
    if task == "translate":
        short = passage[:1800].rsplit("\n", 1)[0] if len(passage) > 1800 else passage
        english = sum(c.isascii() for c in short) > 0.95 * len(short)
        lang = rng.choice(LANGS) if english else "English"
        return task, rng.choice(TRANSLATE).format(p=short, lang=lang, src="English" if english else "this text")
    if task == "summarize":
        return task, rng.choice(SUMMARISE).format(p=passage)
    if task == "extract":
        return task, rng.choice(EXTRACT).format(p=passage, thing=rng.choice(THINGS))
    return task, rng.choice(ANSWER_FROM).format(p=passage, q=rng.choice(QUESTIONS))


def sharegpt_long_items(tokenizer, records, split: str, count: int, seed: int) -> list[dict]:
    """Tasks over passages made of a conversation's own turns (both speakers, as written)."""
    rng, items = random.Random(seed), []
    records = list(records)
    rng.shuffle(records)
    for position, record in records:
        if len(items) >= count:
            break
        text = "\n\n".join((turn.get("value") or "").strip() for turn in record.get("conversations", []))
        windows = passages_of(text, 3000, 7000)
        if not windows:
            continue
        task, user = long_task(rng, windows[0])
        meta = {"key": f"long:{task}:sharegpt:{record['id']}", "source": "sharegpt", "kind": "long", "task": task,
                "turn": 0, "record": f"{position}:{record['id']}", "base": base_of("sharegpt", record["id"]),
                "norm": norm_hash(user), "split": split}
        item = make_item(tokenizer, [{"role": "user", "content": user}], meta, 2048, min_prompt=500)
        if item:
            items.append(item)
    return items


def package_docs() -> list[tuple[str, str]]:
    """(package, long description) from the installed packages' METADATA (their README, as PyPI shows it)."""
    docs = []
    for metadata in sorted(Path(sysconfig.get_paths()["purelib"]).glob("*.dist-info/METADATA")):
        text = metadata.read_text(encoding="utf-8", errors="replace")
        head, _, body = text.partition("\n\n")
        name = next((line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith("Name:")), None)
        if name and len(body) > 3000:
            docs.append((name, body))
    return docs


def doc_long_items(tokenizer, held: bool, count: int, seed: int) -> list[dict]:
    """Tasks over package documentation; packages in the held-out bucket go to the held-out side only."""
    rng, items = random.Random(seed), []
    docs = [(name, body) for name, body in package_docs() if held_out_bucket(base_of("doc", name)) == held]
    rng.shuffle(docs)
    for name, body in docs:
        for number, window in enumerate(passages_of(body, 3000, 7000)[:3]):
            if len(items) >= count:
                return items
            task, user = long_task(rng, window)
            meta = {"key": f"long:{task}:doc:{name}:{number}", "source": "doc", "kind": "long", "task": task,
                    "turn": 0, "record": f"{name}:METADATA:{number}", "base": base_of("doc", name),
                    "norm": norm_hash(user), "split": "heldout" if held else "train"}
            item = make_item(tokenizer, [{"role": "user", "content": user}], meta, 2048, min_prompt=500)
            if item:
                items.append(item)
    return items


def code_prompts(count: int, seed: int = 0, max_lines: int = 40, packages: bool = False,
                 roots: list[tuple[str, Path]] | None = None) -> list[tuple[str, str]]:
    """(key, prompt) completion tasks from the standard library (and, with `packages`, the installed packages'
    own source after it), or from `roots` [(label, folder)]: a function's signature and docstring (plus up to
    `max_lines` lines before it), to be completed. Skips tests and vendored folders. Keys: '<label>:<path>:<function>'
    ('stdlib:...', 'site:...')."""
    if roots is None:
        roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
        if packages:
            roots.append(("site", Path(sysconfig.get_paths()["purelib"])))
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "_vendor", "vendored")
    rng = random.Random(seed)
    files = []
    for label, root in roots:
        found = sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))
        rng.shuffle(found)
        files += [(label, root, path) for path in found]
    prompts = []
    for label, root, path in files:
        if len(prompts) >= count:
            break
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and ast.get_docstring(n)
                 and n.end_lineno - n.lineno >= 6]
        if not funcs:
            continue
        func = rng.choice(funcs)
        body_start = func.body[1].lineno - 1 if len(func.body) > 1 else func.body[0].end_lineno
        snippet = "\n".join(lines[max(0, func.lineno - 1 - max_lines // 2):body_start])
        if 40 < len(snippet) < 4000:
            prompts.append((f"{label}:{path.relative_to(root)}:{func.name}", CODE_ASK.format(snippet=snippet)))
    return prompts


# Held-out code comes from a source no stage could have drawn from: vLLM's own Python, installed only in the
# plugin's virtual environment (stage 1 and 2 drew completions from the main interpreter's standard library, all
# 325 usable files of it, and its site-packages).
HELD_OUT_CODE_ROOT = ("vllm", Path(__file__).resolve().parents[2] / ".venv-vllm" / "lib" / "python3.11" /
                      "site-packages" / "vllm")


def code_items(tokenizer, held: bool, count: int, seed: int) -> list[dict]:
    """Completion prompts (code_prompts): training from the standard library and the main site-packages, files in
    the held-out bucket left out; held-out from vLLM's source (HELD_OUT_CODE_ROOT)."""
    items = []
    roots = [HELD_OUT_CODE_ROOT] if held else None
    if held and not HELD_OUT_CODE_ROOT[1].is_dir():
        raise FileNotFoundError(f"{HELD_OUT_CODE_ROOT[1]}: held-out code needs the vLLM venv (scripts/vllm_venv.sh)")
    for key, text in code_prompts(count * 14, seed=seed, packages=True, roots=roots):
        if len(items) >= count:
            break
        label, path, function = key.split(":", 2)
        record = f"{label}/{path}:{function}"
        base = base_of("code", record)
        if not held and held_out_bucket(base):
            continue
        meta = {"key": f"code:{record}", "source": "code", "kind": "code", "turn": 0, "record": record,
                "base": base, "norm": norm_hash(text), "split": "heldout" if held else "train"}
        item = make_item(tokenizer, [{"role": "user", "content": text}], meta, 1024)
        if item:
            items.append(item)
    return items


def turn_items(tokenizer, answered: dict[str, dict], conversations: dict[str, dict], max_prompt: int = 2048,
               max_turn: int = 3) -> list[dict]:
    """The next user turn of each answered chat/turn item, after the target's own earlier answers (decoded, as a
    client sends them back). answered: key -> committed record (meta, prompt_ids, answer_ids); conversations:
    ShareGPT id -> record. A conversation keeps its sampler through its turns."""
    from .data import to_messages

    def key_of(meta: dict, turn: int) -> str:
        return f"{meta['key'].split('#')[0].rsplit(':t', 1)[0]}:t{turn}#{meta['sampler']}"

    items = []
    for done in answered.values():
        meta = done["meta"]
        turn = meta["turn"] + 1
        if meta["kind"] not in ("chat", "turn") or turn > max_turn or key_of(meta, turn) in answered:
            continue
        record = conversations.get(meta["record"].split(":", 1)[1])
        messages = to_messages(record, max_turns=2 * turn + 2) if record else None
        if not messages or len(messages) < 2 * turn + 1:
            continue
        earlier = [answered.get(key_of(meta, number)) for number in range(turn)]
        if any(e is None or len(e["answer_ids"]) < 2 for e in earlier):
            continue
        chat = []
        for number, record_n in enumerate(earlier):
            answer = tokenizer.decode(record_n["answer_ids"], skip_special_tokens=True).strip()
            chat += [messages[2 * number], {"role": "assistant", "content": answer}]
        chat.append(messages[2 * turn])
        ids = template(tokenizer, chat)
        if len(ids) > max_prompt:
            continue
        key = key_of(meta, turn)
        items.append({"key": key, "prompt_ids": ids, "temperature": 0.0 if meta["sampler"] == "greedy" else 0.7,
                      "meta": {**meta, "key": key, "kind": "turn", "turn": turn, "prompt_tokens": len(ids)}})
    return items

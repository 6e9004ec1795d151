"""The held-out rule for head data: what a base is, when two prompts are the same, and the committed list.

A head is scored on prompts it never trained on, and "never" has to hold for relatives too: ShareGPT splits a long
conversation into parts (`QWJhYvA_0`, `QWJhYvA_1`, ...), code completions cut from one file share its preamble,
and short first turns repeat word for word across users ("hi", "test"). So an item's split is decided by its
*base* (the conversation id without the part suffix, the source file, the documentation's package), and an item
whose normalised first user turn equals a held-out one's never trains.

Where held-out items come from: ShareGPT records from data.SHAREGPT_EVAL_FROM on (evaluation-only by the project's
rule, so no shipped head ever trained on them), and code and package documentation whose file or package falls in
the held-out CRC bucket (and that no earlier stage drew). The list is written once to data/head/<model>/heldout.json
and read from there by every later stage, so every stage is scored on the same prompts.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import zlib
from pathlib import Path

HELD_OUT_EVERY = 12  # 1 in 12 code files / packages is held out (by CRC of its base)


def base_of(source: str, record: str) -> str:
    """The unit a split may not cut: 'sharegpt:<conversation id without its _N part>', 'code:<file>',
    'doc:<package>'. record: the ShareGPT id, 'root/path.py:function' for code, '<package>:<file>' for docs."""
    if source == "sharegpt":
        return f"sharegpt:{re.sub(r'_[0-9]+$', '', record)}"
    if source == "code":
        return f"code:{record.rsplit(':', 1)[0]}"
    if source == "doc":
        return f"doc:{record.split(':', 1)[0].lower().replace('_', '-')}"
    raise ValueError(f"unknown source {source!r}")


def normalise(text: str) -> str:
    """Lower case, accents and punctuation off, whitespace collapsed: 'Hi!!' and ' hi ' are the same prompt."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = re.sub(r"[^\w]+", " ", text.lower(), flags=re.UNICODE)
    return " ".join(text.split())


def norm_hash(text: str) -> str:
    return hashlib.sha1(normalise(text).encode()).hexdigest()[:16]


def held_out_bucket(base: str, every: int = HELD_OUT_EVERY) -> bool:
    """Code files and documentation packages: held out by the CRC of their base."""
    return zlib.crc32(base.encode()) % every == 0


def prompt_sha(ids: list[int]) -> str:
    """A short hash of a prompt's token ids: the manifest's check that a shard holds what its line says."""
    return hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16]


class HeldOut:
    """The committed held-out list: its keys, bases and normalised first turns; `excludes(meta)` is the rule."""

    def __init__(self, items: list[dict], retired: list[dict] | None = None):
        self.items = items
        self.retired = retired or []  # taken off the list (with a reason): neither scored nor trained on
        self.keys = {item["key"] for item in items}
        self.bases = {item["base"] for item in items}
        self.norms = {item["norm"] for item in items}
        self.retired_keys = {item["key"] for item in self.retired}

    def excludes(self, meta: dict) -> bool:
        """True when an item may not train: it is held out, or shares a base or a normalised prompt with one."""
        return (meta["key"] in self.keys or meta["key"] in self.retired_keys or meta["base"] in self.bases
                or meta["norm"] in self.norms)

    @classmethod
    def load(cls, path: Path) -> "HeldOut":
        body = json.loads(Path(path).read_text())
        return cls(body["items"], body.get("retired"))

    def save(self, path: Path, note: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"note": note, "count": len(self.items),
                "items": [{k: item[k] for k in ("key", "base", "norm", "kind")} for item in self.items],
                "retired": self.retired}
        path.write_text(json.dumps(body, indent=0) + "\n")

"""Temporal locality, measured offline: how much of a greedy output an in-context vocabulary would have covered.

The decode engine reports coverage for the one policy it ran. To compare many sources cheaply we replay finished
outputs instead: one target forward over prompt + output gives the target's top-k at every position, then each
candidate source set is grown position by position and every output token is checked against the set built from
EARLIER information only. Token j counts as covered when it is in

    prompt ids  U  target top-k at prompt positions  U  static core  U  output tokens before j
    U  target top-k at output positions <= j - 2        (the top-k predicting tokens up to j - 1)

The last rule mirrors the engine: the top-k at the node that predicts token j arrives with the verification of the
round that commits j, too late to draft it. This is a proxy for ranking sources, not the engine's figure: the
engine also absorbs rejected tree nodes and their top-k (more coverage), but within one round it only knows what
earlier rounds verified (less).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.target import TargetModel


@dataclass(frozen=True)
class Sources:
    prompt_topk: int = 3  # target top-k ids at every prompt position
    output_topk: int = 3  # target top-k ids at every committed output position
    static_core: int = 0  # most frequent ids, always active
    recent_only: int = 0  # > 0: output tokens/top-k older than this many positions are dropped (LRU-like)

    def label(self) -> str:
        parts = [f"prompt top-{self.prompt_topk}", f"output top-{self.output_topk}"]
        if self.static_core:
            parts.append(f"core {self.static_core}")
        if self.recent_only:
            parts.append(f"recent {self.recent_only}")
        return ", ".join(parts)


@dataclass
class Replay:
    """One finished request: its ids and the target's top-k (kmax) at every position."""

    prompt_len: int
    ids: list[int]  # prompt + output
    topk: list[list[int]]  # [len(ids)][kmax]: topk[p] predicts ids[p + 1]
    category: str = ""


def record(target: TargetModel, prompt_ids: torch.Tensor, output_ids: list[int], kmax: int = 10,
           category: str = "") -> Replay:
    """One target forward over prompt + output: the top-k ids at every position."""
    ids = torch.cat([prompt_ids, torch.tensor(output_ids, dtype=torch.long)]).to(target.device)
    cache = target.new_cache(ids.numel())
    hidden = target.forward(ids, cache).hidden
    topk = target.topk_ids(hidden, kmax).tolist()
    return Replay(prompt_len=prompt_ids.numel(), ids=ids.tolist(), topk=topk, category=category)


def coverage(replay: Replay, sources: Sources, core: list[int] = (), specials: list[int] = ()) -> tuple[int, int, float]:
    """(covered output tokens, output tokens, mean active-set size when each output token was drafted)."""
    p = replay.prompt_len
    pinned = set(core[: sources.static_core]) | set(specials)
    prompt_set = set(replay.ids[:p])
    for row in replay.topk[:p]:
        prompt_set.update(row[: sources.prompt_topk])
    last_seen: dict[int, int] = {}  # output-derived id -> last position it was added
    hits, sizes = 0, []
    for j in range(p, len(replay.ids)):
        # information available when token j is drafted: output tokens < j, output top-k at positions <= j - 2
        if j - 1 >= p:
            last_seen[replay.ids[j - 1]] = j - 1
        if j - 2 >= p:
            for token in replay.topk[j - 2][: sources.output_topk]:
                last_seen[token] = j - 2
        if sources.recent_only:
            horizon = j - sources.recent_only
            output_set = {t for t, at in last_seen.items() if at >= horizon}
        else:
            output_set = last_seen.keys()
        token = replay.ids[j]
        hits += token in pinned or token in prompt_set or token in output_set
        sizes.append(len(pinned | prompt_set | set(output_set)))
    total = len(replay.ids) - p
    return hits, total, (sum(sizes) / len(sizes)) if sizes else 0.0


def compare_sources(replays: list[Replay], candidates: list[Sources], core: list[int] = (),
                    specials: list[int] = ()) -> list[dict]:
    """One row per candidate: coverage over all output tokens, mean active size, worst category's coverage."""
    rows = []
    for sources in candidates:
        hits = total = 0
        active = []
        per_category: dict[str, list[int]] = {}
        for replay in replays:
            h, t, a = coverage(replay, sources, core, specials)
            hits, total = hits + h, total + t
            active.append(a)
            cat = per_category.setdefault(replay.category, [0, 0])
            cat[0], cat[1] = cat[0] + h, cat[1] + t
        worst = min(per_category.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1))
        rows.append({"sources": sources.label(), "coverage": hits / max(total, 1),
                     "avg_active": sum(active) / max(len(active), 1),
                     "worst_category": f"{worst[0]} {worst[1][0] / max(worst[1][1], 1):.2f}"})
    return rows

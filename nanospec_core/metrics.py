"""Typed per-round statistics and the run summary built from them.

Conventions (as in vLLM's spec-decode stats):
- `accepted` counts the tokens a round COMMITS: the accepted draft tokens plus the target's bonus token, so
  mean(accepted) over the rounds is tau, the mean acceptance length "including the bonus token".
- `hit`: the share of those committed tokens that were in the active vocabulary when the round was drafted.
  Drafted tokens are in it by construction, so the misses show up as bonus tokens the draft could not propose.
  coverage = total hits / total committed tokens over the run.
- Times are in milliseconds per round, read after a device synchronize. The prefill (target prompt forward plus
  the first token) is reported as round 0 and kept out of tau, draft and verify totals.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class TreeView:
    """One round's draft tree as the host saw it at verification (no extra device read): node i has token
    tokens[i], parent parents[i] (-1 = a child of the root), cumulative draft log-prob scores[i]; `path` lists the
    accepted nodes root-down (node indices), `bonus` is the target's token after the last of them."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    path: list[int] = field(default_factory=list)
    bonus: int = -1
    origins: list[str] | None = None  # per node: 'head', 'copy' (added by a copy branch), 'both' (head node copied too)
    sources: list[int | None] | None = None  # per node: the context position a copy branch copied it from

    def to_json(self) -> dict:
        row = {"tokens": self.tokens, "parents": self.parents, "scores": [round(v, 4) for v in self.scores],
               "path": self.path, "bonus": self.bonus}
        if self.origins is not None and any(origin != "head" for origin in self.origins):  # copies present
            row.update(origins=self.origins, sources=self.sources)
        return row


@dataclass
class StepStats:
    round: int  # 0 = prefill, then 1, 2, ...
    tokens: list[int]  # token ids committed this round (truncated at EOS / max_new_tokens)
    accepted: int  # len(tokens): accepted drafts + bonus (see module docstring)
    tree_size: int = 0  # draft nodes verified this round
    active_vocab: int | None = None  # rows the draft lm head scored (None for methods without a draft)
    hits: list[bool] | None = None  # per committed token: was it in the active set at draft time
    origins: list[str] | None = None  # per committed token: where its id entered the active set ('' = miss)
    fallback: bool = False  # this round drafted on the full vocabulary (coverage fallback)
    draft_ms: float = 0.0  # backbone + lm head + gather wait + tree bookkeeping
    backbone_ms: float = 0.0  # head decoder layer(s) incl. absorbing the accepted tokens
    lm_head_ms: float = 0.0  # draft lm head (full, static or active rows) + top-k
    gather_ms: float = 0.0  # waiting on / doing the incremental lm-head row gather
    tree_ms: float = 0.0  # tree selection, masks, bookkeeping
    verify_ms: float = 0.0  # target forward over the tree + acceptance
    prefill_ms: float = 0.0  # round 0 only
    finished: bool = False  # EOS or max_new_tokens reached
    tree: "TreeView | None" = None  # the round's draft tree and which path the target took (for the round view)
    copy_nodes: int = 0  # tree nodes copy branches added this round (beyond the head's): their extra verify cost
    copy_accepted: int = 0  # committed tokens those nodes held: what the copies gained beyond the head
    copied: list[bool] | None = None  # per committed token: held by a copy-added node (the bonus never is)
    head_free: bool = False  # the round drafted no head tree: the copies alone were expected faster

    @property
    def hit(self) -> float | None:
        return None if not self.hits else sum(self.hits) / len(self.hits)

    def to_json(self) -> dict:
        """The per-step JSON contract of the CLI (extra keys are allowed, these five are required)."""
        row = {"accepted": self.accepted, "active_vocab": self.active_vocab, "hit": self.hit,
               "draft_ms": round(self.draft_ms, 3), "verify_ms": round(self.verify_ms, 3)}
        row.update(round=self.round, tree_size=self.tree_size, backbone_ms=round(self.backbone_ms, 3),
                   lm_head_ms=round(self.lm_head_ms, 3), gather_ms=round(self.gather_ms, 3),
                   tree_ms=round(self.tree_ms, 3), fallback=self.fallback, copy_nodes=self.copy_nodes,
                   copy_accepted=self.copy_accepted, head_free=self.head_free)
        if self.tree is not None:
            row["tree"] = self.tree.to_json()
        return row


@dataclass
class RunSummary:
    new_tokens: int
    wall_s: float
    tokens_per_s: float
    rounds: int
    mean_accepted: float | None  # tau
    draft_s: float
    verify_s: float
    avg_active_vocab: float | None
    coverage: float | None
    prefill_s: float = 0.0
    backbone_s: float = 0.0
    lm_head_s: float = 0.0
    gather_s: float = 0.0
    tree_s: float = 0.0
    median_draft_ms: float | None = None
    fallback_rounds: int = 0
    copy_nodes: int = 0  # tree nodes copy branches added, over all rounds
    copy_tokens: int = 0  # committed tokens from copy-added nodes
    head_free_rounds: int = 0  # rounds that drafted copies alone (no head tree)

    @property
    def round_ms(self) -> float | None:
        """A round's whole wall time (draft, verify and bookkeeping; the prefill left out), None without rounds."""
        return 1e3 * (self.wall_s - self.prefill_s) / self.rounds if self.rounds else None

    @property
    def copy_share(self) -> float:
        """Share of the new tokens that came from copy branches (not the head, not a bonus)."""
        return self.copy_tokens / self.new_tokens if self.new_tokens else 0.0

    def to_json(self) -> dict:
        data = {**asdict(self), "copy_share": self.copy_share}
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in data.items()}


def summarize(steps: list[StepStats], wall_s: float) -> RunSummary:
    """Aggregate the rounds of one request (round 0 = prefill is excluded from tau and the draft/verify split)."""
    rounds = [s for s in steps if s.round > 0]
    new_tokens = sum(s.accepted for s in steps)
    active = [s.active_vocab for s in rounds if s.active_vocab is not None]
    hits = [h for s in rounds if s.hits for h in s.hits]
    total = lambda name: sum(getattr(s, name) for s in rounds) / 1000.0  # noqa: E731 - ms -> s
    return RunSummary(
        new_tokens=new_tokens,
        wall_s=wall_s,
        tokens_per_s=new_tokens / wall_s if wall_s > 0 else 0.0,
        rounds=len(rounds),
        mean_accepted=(sum(s.accepted for s in rounds) / len(rounds)) if rounds else None,
        draft_s=total("draft_ms"),
        verify_s=total("verify_ms"),
        avg_active_vocab=(sum(active) / len(active)) if active else None,
        coverage=(sum(hits) / len(hits)) if hits else None,
        prefill_s=sum(s.prefill_ms for s in steps) / 1000.0,
        backbone_s=total("backbone_ms"),
        lm_head_s=total("lm_head_ms"),
        gather_s=total("gather_ms"),
        tree_s=total("tree_ms"),
        median_draft_ms=statistics.median(s.draft_ms for s in rounds) if rounds and rounds[0].tree_size else None,
        fallback_rounds=sum(s.fallback for s in rounds),
        copy_nodes=sum(s.copy_nodes for s in rounds),
        copy_tokens=sum(s.copy_accepted for s in rounds),
        head_free_rounds=sum(s.head_free for s in rounds),
    )

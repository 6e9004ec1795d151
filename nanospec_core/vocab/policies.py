"""Active-vocabulary policies: which lm-head rows the draft head scores each round.

- FullVocab:      plain EAGLE-2, the whole [V, H] GEMM.
- StaticVocab:    FR-Spec (Zhao et al., 2025, arXiv:2502.14856): the K most frequent tokens of a corpus.
- InContextVocab: NanoSpec, training-free: the tokens of THIS context. Seeded with the prompt, the target's top-k at
                  every prompt position and the special ids; grows with every drafted, verified and committed token;
                  bounded by LRU eviction; optionally falls back to the full vocabulary when coverage drops.

The engine's round, in calls:
    policy.begin(prompt_ids, prompt_topk_ids, special_ids)      # once per request
    loop:
        policy.prepare()                 # launch the gather of rows added last round (overlaps the head backbone)
        logp, ids = policy.topk(h, k)    # per tree level; ids are real target ids
        hits = policy.contains(committed)
        policy.observe(drafted, node_topk_ids, committed, hits)

Drafting from a subset never changes the output: verification is against the target, and the draft distribution
(renormalised over the active set) is what rejection sampling sees. It only changes how often drafts are accepted.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque

import torch

from ..config import VocabConfig
from ..errors import NanoSpecError
from ..decoding.host import read
from ..models.cpu_layout import matmul_weight
from .subset_head import SubsetLMHead, full_topk, resolve_buffer_dtype


class VocabPolicy(ABC):
    """The interface the decode engine calls; see the module docstring for the order of calls."""

    name: str = ""
    prompt_topk: int = 0  # target top-k ids per prompt position wanted by begin() (0 = none)
    node_topk: int = 0  # target top-k ids per verified tree node wanted by observe() (0 = none)
    last_gather_s: float = 0.0  # seconds spent gathering / waiting on the gather in the last prepare() + topk()
    last_round_full: bool = False  # the round observe() just closed drafted on the full vocabulary (a fallback)

    def begin(self, prompt_ids: torch.Tensor, prompt_topk_ids: torch.Tensor | None,
              special_ids: torch.Tensor) -> None:
        """A new request: reset per-request state."""

    def prepare(self) -> None:
        """Start of a round, before the head backbone runs."""
        self.last_gather_s = 0.0

    @abstractmethod
    def topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [m, H] -> (logp [m, k] float32, log-softmax over the active set; target ids [m, k])."""

    @abstractmethod
    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        """Membership of target ids in the active set now (bool, same shape)."""

    def observe(self, drafted_ids: torch.Tensor, node_topk_ids: torch.Tensor | None,
                committed_ids: torch.Tensor, hits: torch.Tensor) -> None:
        """After verification: absorb the round's ids."""

    ORIGINS: tuple[str, ...] = ("",)  # names of the codes origin_tags returns ('' = not in the active set)

    def origin_tags(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Where each id entered the active set, as device codes into ORIGINS (a policy that tracks it), else None."""
        return None

    def origins(self, ids: torch.Tensor) -> list[str] | None:
        """origin_tags as names (one device read)."""
        tags = self.origin_tags(ids)
        return None if tags is None else [self.ORIGINS[t] for t in read(tags)[0]]

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of ids the draft head scores now."""


def _target_to_head(head_to_target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Inverse of an EAGLE-3 d2t map: target id -> head row, -1 for ids the head cannot draft. [vocab_size]"""
    row_of_id = torch.full((vocab_size,), -1, dtype=torch.long, device=head_to_target.device)
    row_of_id[head_to_target.long()] = torch.arange(head_to_target.numel(), device=head_to_target.device)
    return row_of_id


class FullVocab(VocabPolicy):
    """Plain EAGLE: score every row of the head's lm head."""

    name = "full"

    def __init__(self, lm_head_weight: torch.Tensor, vocab_size: int, head_to_target: torch.Tensor | None = None):
        self.weight = matmul_weight(lm_head_weight)  # [Vh, H]: the layout the target's logits use (shared copy)
        self.vocab_size = vocab_size
        self.head_to_target = None if head_to_target is None else head_to_target.to(lm_head_weight.device).long()
        in_head = torch.zeros(vocab_size + 1, dtype=torch.bool, device=lm_head_weight.device)  # [V + 1]
        if head_to_target is None:
            in_head[: min(lm_head_weight.shape[0], vocab_size)] = True
        else:
            in_head[self.head_to_target] = True
        in_head[vocab_size] = False  # sentinel for out-of-range ids
        self._in_head = in_head

    def topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return full_topk(self.weight, hidden, k, self.head_to_target)

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self._in_head.device, torch.long)
        safe = torch.where((ids >= 0) & (ids < self.vocab_size), ids, self.vocab_size)
        return self._in_head[safe]

    @property
    def size(self) -> int:
        return self.weight.shape[0]


def _draftable_by_frequency(frequency: torch.Tensor | None, row_of_id: torch.Tensor | None, vocab_size: int,
                            what: str) -> torch.Tensor:
    """Frequency-sorted target ids restricted to those the head can draft."""
    if frequency is None:
        raise NanoSpecError(f"{what} needs a token-frequency table; build it with `python -m nanospec_core prepare`")
    frequency = frequency.long()
    frequency = frequency[(frequency >= 0) & (frequency < vocab_size)]
    if row_of_id is not None:
        frequency = frequency[row_of_id.to(frequency.device)[frequency] >= 0]
    return frequency


class StaticVocab(VocabPolicy):
    """FR-Spec: the static_k most frequent draftable ids, gathered once into a contiguous buffer.

    With an EAGLE-3 head the list is first restricted to the head's vocabulary, so all K rows are draftable.
    """

    name = "static"

    def __init__(self, lm_head_weight: torch.Tensor, cfg: VocabConfig, vocab_size: int,
                 frequency: torch.Tensor | None, row_of_id: torch.Tensor | None = None):
        ids = _draftable_by_frequency(frequency, row_of_id, vocab_size, "the static policy")[: cfg.static_k]
        self.subset = SubsetLMHead(lm_head_weight, max(1, ids.numel()), vocab_size, row_of_id,
                                   resolve_buffer_dtype(cfg.buffer_dtype, lm_head_weight))
        self.subset.add(ids, pinned=True)
        self.subset.gather()

    def topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.subset.topk(hidden, k)

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        return self.subset.contains(ids)

    @property
    def size(self) -> int:
        return self.subset.size


class InContextVocab(VocabPolicy):
    """NanoSpec: the draft head scores the ids of this context, kept in a bounded, LRU-evicted buffer.

    Pinned (never evicted): the static core (cfg.static_core most frequent ids) and the special/EOS ids.
    Fallback: with cfg.fallback_threshold > 0, once the last cfg.fallback_window rounds' hit rate (committed
    tokens that were active when drafted / committed tokens) is under the threshold, the next round drafts on the
    full vocabulary and the window restarts. `size` and `contains` always describe the active set (so coverage and
    average active size stay comparable); `full_vocab_round` / `last_round_full` say when the full head ran.
    """

    name = "nanospec"
    ORIGINS = ("", "prompt", "prompt-topk", "special", "static-core", "output", "node-topk", "draft")
    _CODE = {origin: code for code, origin in enumerate(ORIGINS)}

    def __init__(self, lm_head_weight: torch.Tensor, cfg: VocabConfig, vocab_size: int,
                 frequency: torch.Tensor | None = None, head_to_target: torch.Tensor | None = None):
        self.cfg = cfg
        self.prompt_topk = cfg.prompt_topk
        self.node_topk = cfg.node_topk
        row_of_id = None if head_to_target is None else _target_to_head(head_to_target.to(lm_head_weight.device),
                                                                        vocab_size)
        self.core_ids = None
        if cfg.static_core > 0:
            if cfg.static_core >= cfg.capacity:
                raise NanoSpecError(f"static_core ({cfg.static_core}) must be smaller than capacity ({cfg.capacity})")
            self.core_ids = _draftable_by_frequency(frequency, row_of_id, vocab_size, "static_core")[: cfg.static_core]
        self.subset = SubsetLMHead(lm_head_weight, cfg.capacity, vocab_size, row_of_id,
                                   resolve_buffer_dtype(cfg.buffer_dtype, lm_head_weight))
        self.full = FullVocab(lm_head_weight, vocab_size, head_to_target)
        self.fallback_rounds = 0
        self.last_round_full = False  # the round observe() just closed drafted on the full vocabulary
        self._window: deque[tuple[int, int]] = deque(maxlen=max(1, cfg.fallback_window))  # (hits, committed)
        self._full_this_round = False

    def begin(self, prompt_ids: torch.Tensor, prompt_topk_ids: torch.Tensor | None,
              special_ids: torch.Tensor) -> None:
        self.subset.reset()
        self.fallback_rounds = 0
        self.last_round_full = False
        self._window.clear()
        self._full_this_round = False
        code = self._CODE
        if self.core_ids is not None:
            self.subset.add(self.core_ids, pinned=True, tags=code["static-core"])
        self.subset.add(special_ids, pinned=True, tags=code["special"])
        # Position by position ([P, 1 + k] flattened), so if the prompt overflows the capacity the end of the
        # prompt, closest to what comes next, is what stays.
        seed = prompt_ids.reshape(-1, 1).to(self.subset.device)  # [P, 1]
        tags = torch.full_like(seed, code["prompt"])
        if prompt_topk_ids is not None and prompt_topk_ids.numel():
            topk_ids = prompt_topk_ids.to(self.subset.device).reshape(seed.shape[0], -1)  # [P, k]
            seed = torch.cat([seed, topk_ids], dim=1)
            tags = torch.cat([tags, torch.full_like(topk_ids, code["prompt-topk"])], dim=1)
        self.subset.add(seed, tags=tags)

    def prepare(self) -> None:
        start = time.perf_counter()
        if not self._full_this_round:
            self.subset.gather()  # CPU: the copy itself; CUDA: only the launch on the side stream
        self.last_gather_s = time.perf_counter() - start

    def topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._full_this_round:
            return self.full.topk(hidden, k)
        self.last_gather_s += self.subset.wait()  # CUDA: the GEMM waits on the gather event
        return self.subset.topk(hidden, k)

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        return self.subset.contains(ids)

    def observe(self, drafted_ids: torch.Tensor, node_topk_ids: torch.Tensor | None,
                committed_ids: torch.Tensor, hits: torch.Tensor) -> None:
        self.subset.tick()
        device, code = self.subset.device, self._CODE
        parts = [(drafted_ids, "draft"), (node_topk_ids, "node-topk"), (committed_ids, "output")]
        parts = [(ids.reshape(-1).to(device), origin) for ids, origin in parts if ids is not None]
        # committed ids last: they are the ones kept if the batch alone overflows the capacity
        ids = torch.cat([ids for ids, _ in parts])
        tags = torch.cat([torch.full_like(ids, code[origin]) for ids, origin in parts])
        self.subset.add(ids, tags=tags)
        self.last_round_full = self._full_this_round
        self._update_fallback(hits)

    def origin_tags(self, ids: torch.Tensor) -> torch.Tensor:
        """Where each id entered the active set ('prompt', 'prompt-topk', 'special', 'static-core', 'output',
        'node-topk', 'draft'), 0 ('') for a miss. Call right after observe(): ids that observe() itself just added
        were not active while drafting, so they count as misses."""
        tags, added_at = self.subset.tag_of(ids)
        just_added = (added_at == self.subset.clock) & (self.subset.clock > 0)
        return torch.where(self.contains(ids) & ~just_added, tags, 0).reshape(-1)

    def _update_fallback(self, hits: torch.Tensor) -> None:
        if self._full_this_round:  # the fallback round is over; measure coverage afresh
            self._full_this_round = False
            self._window.clear()
            return
        if self.cfg.fallback_threshold <= 0:
            return
        # One more scalar read, only with the fallback on (the engine reads the hit count for its stats anyway).
        self._window.append((read(hits.sum())[0][0], hits.numel()))
        if len(self._window) == self._window.maxlen:
            num_hits = sum(h for h, _ in self._window)
            num_committed = sum(c for _, c in self._window)
            if num_committed and num_hits / num_committed < self.cfg.fallback_threshold:
                self._full_this_round = True
                self.fallback_rounds += 1

    @property
    def full_vocab_round(self) -> bool:
        """True when the current round drafts on the full vocabulary (fallback)."""
        return self._full_this_round

    @property
    def size(self) -> int:
        return self.subset.size


def make_policy(name: str, lm_head_weight: torch.Tensor, cfg: VocabConfig, vocab_size: int,
                head_to_target: torch.Tensor | None = None, frequency: torch.Tensor | None = None) -> VocabPolicy:
    """Build a policy by name: 'full' (also 'eagle'), 'static', 'nanospec'.

    lm_head_weight: the head's lm head [Vh, H] (EAGLE-2: the target's own, shared, never copied in full).
    head_to_target: EAGLE-3 heads' draft index -> target id map [Vh]; target ids outside it are never drafted.
    frequency: target ids by descending corpus frequency (frequency.load_frequency).
    """
    if name in ("full", "eagle"):
        return FullVocab(lm_head_weight, vocab_size, head_to_target)
    if name == "static":
        row_of_id = None
        if head_to_target is not None:
            row_of_id = _target_to_head(head_to_target.to(lm_head_weight.device), vocab_size)
        return StaticVocab(lm_head_weight, cfg, vocab_size, frequency, row_of_id)
    if name == "nanospec":
        return InContextVocab(lm_head_weight, cfg, vocab_size, frequency, head_to_target)
    raise NanoSpecError(f"unknown vocabulary policy {name!r}; choose one of full, static, nanospec")

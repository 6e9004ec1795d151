"""Rows of the draft lm head by target token id: the one place that knows how the head vLLM ended up with is laid out.

    target id t --draft_index--> draft row d --shard--> rank-local row d - start   (or 0 when another rank holds d)

* A pruned draft vocabulary (EAGLE-3's d2t) scores Vd < V rows: draft row d stands for target id d + d2t[d], so
  `draft_index[t]` is d, or -1 for an id the head cannot draft (`draftable` lists the others).
* Under tensor parallelism the lm head is vocab-parallel: rank r holds draft rows [start_r, end_r) of its shard only.
  Each rank gathers the rows it holds (zeros for the rest) and one all-reduce (sum) gives every rank the full rows:
  exactly one rank contributes each row. The restricted product then runs replicated on every rank, which is what
  vLLM's all-gathered draft logits are too. The gather runs at a buffer flush (the host's decisions, identical on
  every rank, so every rank joins the same collectives in the same order), never inside a draft step.
* The weight is read from the head module at each gather, never kept: vLLM replaces the draft's lm head with the
  target's after loading (`_maybe_share_lm_head`), and the draft's own then is either a duplicate or, for a head
  without one, uninitialised memory.
"""
from __future__ import annotations

from typing import Callable

import torch


def draft_index_of(d2t: torch.Tensor | None, vocab_size: int, device) -> torch.Tensor | None:
    """[V] long: the draft row of each target id (-1: not draftable); None for a full draft vocabulary."""
    if d2t is None:
        return None
    rows = torch.arange(d2t.shape[0], device=device)
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
    index[rows + d2t.to(device=device, dtype=torch.long)] = rows
    return index


class HeadRows:
    """`gather(ids)` -> the lm-head rows [n, H] of target ids (long, on the head's device).

    head: the lm head module (or a callable returning the current one, or a plain weight tensor [Vd_local, H]).
    shard: (start, end) of the draft rows this rank holds (tensor parallelism), with `all_reduce` summing over ranks.
    """

    def __init__(self, head, vocab_size: int, draft_index: torch.Tensor | None = None,
                 shard: tuple[int, int] | None = None, all_reduce: Callable | None = None):
        self._head = head
        self.vocab_size = vocab_size
        self.draft_index = draft_index
        self.shard = shard
        self.all_reduce = all_reduce
        if shard is not None and all_reduce is None:
            raise ValueError("a sharded lm head needs the all-reduce that assembles its rows")
        self.draftable = None if draft_index is None else set(draft_index.ge(0).nonzero().flatten().tolist())

    @property
    def weight(self) -> torch.Tensor:
        head = self._head() if callable(self._head) and not isinstance(self._head, torch.nn.Module) else self._head
        return head if isinstance(head, torch.Tensor) else head.weight

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def fingerprint(self) -> tuple:
        """Changes when the head's weight is another tensor (shared after loading, reloaded)."""
        weight = self.weight
        return id(weight), weight.data_ptr(), tuple(weight.shape), weight.dtype

    def first_draftable(self) -> int:
        return 0 if self.draftable is None else min(self.draftable)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        rows = ids if self.draft_index is None else self.draft_index[ids]
        if self.shard is None:
            return weight[rows]
        start, end = self.shard
        mine = (rows >= start) & (rows < end)
        local = weight[torch.where(mine, rows - start, 0)].masked_fill(~mine.unsqueeze(1), 0)  # others' rows: 0
        return self.all_reduce(local)

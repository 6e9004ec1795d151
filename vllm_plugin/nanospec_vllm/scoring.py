"""The restricted draft lm head: logits [R, V] that are the full head's at each row's active ids and -inf elsewhere.

Both forms multiply the hidden states by buffer rows only, `hidden [R, H] @ rows.T -> [R, n]`, apply what vLLM's
LogitsProcessor applies after its own product (soft cap, then scale: the same numbers as the full head's at those
ids), mask each row to its own set, and scatter the columns to their token ids in a [R, V] tensor of -inf (the shape
the engine's argmax, Gumbel sampler and rejection sampler expect). Softmax of such a row is the draft distribution q
restricted to the set: zero outside it, summing to one over it, so rejection sampling with it stays lossless.

* `score_union` (Model Runner V1, eager): n = the entries in use, ids unique, the row -> slot map prepared on the
  host once per engine step. Cheapest: it multiplies only the union of the live requests' sets.
* `score_fixed` (Model Runner V2, inside the speculator's draft step, which vLLM records as one FULL CUDA graph): every
  shape is fixed (n = the buffer's capacity C), the row -> slot map is the speculator's own device tensor of
  request-state indices, and nothing reads the host or allocates from it, so one captured graph replays for any
  batch. Entries not in use hold no member (-inf); their ids are spread (entry p starts as id p), and columns go
  in with `scatter_reduce(amax)`, so an unused entry that shares an id with a live one never overwrites it (max
  with -inf) and no column is written by thousands of entries. Rows without a live set (a padded row, index -1, or
  a request whose set is empty) score the reserved last membership row (the static core, or one draftable id), so
  no row is all -inf (softmax would be NaN and a greedy argmax id 0, outside any set). The counters
  [calls, rows, active ids, fallback rows] are added on the device: the same kernels run at every graph replay; a
  call counts when one of its rows is a request's (a batch of empty sets drafts from the reserved set: restricted).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


@dataclass(frozen=True)
class LogitTransform:
    """What vLLM's LogitsProcessor does after the head's product: tanh soft cap, then scale (its forward())."""

    scale: float = 1.0
    soft_cap: float | None = None

    @classmethod
    def of(cls, logits_processor) -> "LogitTransform":
        return cls(float(getattr(logits_processor, "scale", 1.0)), getattr(logits_processor, "soft_cap", None))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits


def score_union(hidden: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, allowed: torch.Tensor, vocab_size: int,
                transform: LogitTransform) -> torch.Tensor:
    """hidden [R, H], rows [n, H] (the buffer's used entries), ids [n] (unique), allowed [R, n] -> logits [R, V]."""
    sub = transform(F.linear(hidden.to(rows.dtype), rows))  # [R, n]
    sub = sub.masked_fill(~allowed, NEG_INF)
    out = sub.new_full((hidden.shape[0], vocab_size), NEG_INF)
    out[:, ids] = sub
    return out


def score_fixed(hidden: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, member: torch.Tensor,
                slot_live: torch.Tensor, slot_held: torch.Tensor, row_slots: torch.Tensor, vocab_size: int,
                transform: LogitTransform, counters: torch.Tensor) -> torch.Tensor:
    """hidden [R, H], rows [C, H], ids [C], member [S + 1, C] (last row: reserved), slot_live [S + 1] (a restricted
    set), slot_held [S + 1] (a request), row_slots [R] (request-state index, -1 for a padded row), counters [4] long
    (added to) -> logits [R, V]. A call counts when a row belongs to a request, restricted set or reserved one."""
    reserved = member.shape[0] - 1
    index = row_slots.long()
    held = (index >= 0) & slot_held[index.clamp(min=0)]  # [R] rows of requests
    live = held & slot_live[index.clamp(min=0)]  # [R] rows of requests with a restricted set
    slot = torch.where(live, index, reserved)
    allowed = member[slot]  # [R, C]
    sub = transform(F.linear(hidden.to(rows.dtype), rows))  # [R, C]
    sub = sub.masked_fill(~allowed, NEG_INF)
    out = sub.new_full((hidden.shape[0], vocab_size), NEG_INF)
    out.scatter_reduce_(1, ids.unsqueeze(0).expand(hidden.shape[0], -1), sub, reduce="amax", include_self=True)
    counted = torch.stack([held.any().long(), live.sum(), (allowed & live.unsqueeze(1)).sum(),
                           (held & ~live).sum()])
    counters.add_(counted)
    return out

"""Per-request active vocabularies for a batch of drafts: one persistent buffer of lm-head rows on the device.

NanoSpec's draft lm head scores only the ids a request has already seen (temporal locality). In a serving engine
every running request has its own set, and one draft step scores a row per request, so this keeps

    buffer_ids  [C]     token ids whose lm-head rows have been gathered (the union over live requests, grown
                        incrementally: an id's row is copied once, when the first request needs it)
    buffer_rows [C, H]  those rows of the draft lm head, in buffer order
    member      [S, C]  request slot x buffer position: is the id active for that request

so one step is a single product over the union, `hidden [B, H] @ buffer_rows[:n].T -> [B, n]`, then each row masked
to its own set and scattered into a [B, V] tensor of -inf (what the engine's argmax and sampler expect). A drafted
id is therefore always one of its request's own active ids, and verification by the target keeps the output exact.

Host mirrors (`position`, `active`) say what is new without reading the device; the device only receives writes,
batched per step (`flush`: one row gather, one membership scatter) before the step's first product.
Bounds: a request whose set passes `capacity` drafts from the full vocabulary from then on (`full_slots`); when the
buffer fills, it is rebuilt from the live requests' sets (finished requests' rows dropped), and a union still too big
makes that step score the full vocabulary, masked per row.

Worked example (V = 10, core {0}): request a absorbs [5, 3, 5] -> buffer_ids [0, 5, 3], member[a] = [1, 1, 1];
request b absorbs [7] -> buffer_ids [0, 5, 3, 7], member[b] = [1, 0, 0, 1]. A step with rows (a, b) scores 4 rows of
the lm head instead of 10; row b's logits at ids 5 and 3 are -inf.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepStats:
    """Counters over draft steps (a step = one call of the draft lm head for a batch of rows)."""

    steps: int = 0  # steps scored through the active sets
    rows: int = 0  # rows (request x draft position) scored through them
    active_sum: int = 0  # sum over those rows of the row's own active-set size
    scored_sum: int = 0  # sum over steps of lm-head rows actually multiplied (the union, or V when full)
    full_rows: int = 0  # rows that drafted from the full vocabulary (a set over capacity, or no batch context)
    unmapped_steps: int = 0  # steps with no batch context (the engine's warm-up and dummy runs): full vocabulary
    rebuilds: int = 0  # buffer rebuilds (compactions)
    requests: int = 0  # requests that got a slot
    per_request: list = field(default_factory=list)  # final active-set size of each released request

    def to_json(self) -> dict:
        rows = max(self.rows, 1)
        return {"steps": self.steps, "rows": self.rows, "avg_active": self.active_sum / rows,
                "avg_scored_rows": self.scored_sum / max(self.steps, 1), "full_rows": self.full_rows,
                "unmapped_steps": self.unmapped_steps, "rebuilds": self.rebuilds, "requests": self.requests,
                "avg_final_active": sum(self.per_request) / max(len(self.per_request), 1)}


class ActiveVocab:
    """Active sets of up to `slots` live requests over a vocabulary of `vocab_size` target ids (module docstring).

    lm_head_weight [V_draft, H]: the draft lm head's rows. draft_index [V] long: the row of each target id, -1 for
    ids outside a pruned draft vocabulary (EAGLE-3's d2t); None for a full draft vocabulary (row = id).
    """

    def __init__(self, lm_head_weight: torch.Tensor, vocab_size: int, slots: int, core_ids=(), capacity: int = 8192,
                 buffer_capacity: int = 32768, draft_index: torch.Tensor | None = None):
        if capacity < 1 or buffer_capacity < capacity:
            raise ValueError(f"need 1 <= capacity ({capacity}) <= buffer_capacity ({buffer_capacity})")
        self.weight, self.vocab_size, self.capacity = lm_head_weight, vocab_size, capacity
        device, hidden = lm_head_weight.device, lm_head_weight.shape[1]
        self.buffer_capacity = min(buffer_capacity, vocab_size)
        self.draft_index = draft_index
        drafted = range(vocab_size) if draft_index is None else draft_index.ge(0).nonzero().flatten().tolist()
        self.draftable = set(drafted) if draft_index is not None else None
        self.core = self._draftable(core_ids)
        if len(self.core) > capacity:
            raise ValueError(f"the static core ({len(self.core)} ids) does not fit the capacity {capacity}")
        self.buffer_ids = torch.zeros(self.buffer_capacity, dtype=torch.long, device=device)
        self.buffer_rows = torch.zeros(self.buffer_capacity, hidden, dtype=lm_head_weight.dtype, device=device)
        self.member = torch.zeros(slots, self.buffer_capacity, dtype=torch.bool, device=device)
        self.used = 0  # buffer entries filled
        self.position: dict[int, int] = {}  # host mirror: token id -> buffer position
        self.active: dict[str, set[int]] = {}  # host mirror: request -> its active ids
        self.slot_of: dict[str, int] = {}
        self.free = list(range(slots - 1, -1, -1))
        self.full_slots: set[int] = set()  # requests over capacity: full vocabulary
        self.pending_ids: list[int] = []  # buffer entries decided on the host, rows not gathered yet
        self.pending_marks: list[tuple[int, int]] = []  # (slot, buffer position) memberships not written yet
        self.stats = StepStats()
        self._append(self.core)
        self.flush()

    # ----- growing the sets (host decides, device receives writes) -----
    def _draftable(self, ids) -> list[int]:
        unique = dict.fromkeys(int(i) for i in ids if 0 <= int(i) < self.vocab_size)
        return [i for i in unique if self.draftable is None or i in self.draftable]

    def _rows_of(self, index: torch.Tensor) -> torch.Tensor:
        if self.draft_index is not None:
            index = self.draft_index[index]
        return self.weight[index]

    def _append(self, ids: list[int]) -> None:
        """Give ids new to the buffer its next entries; their rows are gathered at the next flush."""
        new = [i for i in ids if i not in self.position]
        self.position.update((token, self.used + k) for k, token in enumerate(new))
        self.pending_ids += new
        self.used += len(new)

    def flush(self) -> None:
        """Apply what the host decided since the last flush to the device, in one gather and one scatter: the new
        buffer entries (ids and their lm-head rows) and the new (slot, position) memberships."""
        if self.pending_ids:
            start = self.used - len(self.pending_ids)
            index = torch.tensor(self.pending_ids, dtype=torch.long, device=self.weight.device)
            self.buffer_ids[start:self.used] = index
            self.buffer_rows[start:self.used] = self._rows_of(index)
            self.pending_ids = []
        if self.pending_marks:
            marks = torch.tensor(self.pending_marks, dtype=torch.long, device=self.member.device)  # [m, 2]
            self.member[marks[:, 0], marks[:, 1]] = True
            self.pending_marks = []

    def absorb(self, request: str, token_ids) -> None:
        """Add token ids (prompt, committed output) to `request`'s set, giving it a slot on first sight."""
        if request not in self.slot_of:
            if not self.free:
                raise RuntimeError(f"nanospec: more live requests than the {self.member.shape[0]} slots")
            slot = self.free.pop()  # released slots were zeroed
            self.slot_of[request], self.active[request] = slot, set(self.core)
            self._mark(slot, self.core)
            self.stats.requests += 1
        slot, active = self.slot_of[request], self.active[request]
        new = [i for i in self._draftable(token_ids) if i not in active]
        if not new or slot in self.full_slots:
            return
        if len(active) + len(new) > self.capacity:  # bounded: this request falls back to the full vocabulary
            self.full_slots.add(slot)
            return
        active.update(new)
        if self.used + len(new) > self.buffer_capacity:
            self._rebuild()
        if self.used + len(new) > self.buffer_capacity:  # the live union alone fills the buffer
            self.full_slots.add(slot)
            return
        self._append(new)
        self._mark(slot, new)

    def _mark(self, slot: int, ids: list[int]) -> None:
        self.pending_marks += [(slot, self.position[i]) for i in ids]

    def release(self, request: str) -> None:
        """A finished request frees its slot; its rows stay in the buffer until the next rebuild."""
        slot = self.slot_of.pop(request, None)
        if slot is None:
            return
        self.stats.per_request.append(len(self.active.pop(request)))
        self.pending_marks = [mark for mark in self.pending_marks if mark[0] != slot]
        self.member[slot].zero_()
        self.full_slots.discard(slot)
        self.free.append(slot)

    def _rebuild(self) -> None:
        """Compact the buffer to the core plus the live requests' ids (finished requests' rows are dropped)."""
        self.stats.rebuilds += 1
        self.used, self.position, self.pending_ids, self.pending_marks = 0, {}, [], []
        self.member.zero_()
        self._append(self.core)
        for request, slot in self.slot_of.items():
            if slot in self.full_slots:
                continue
            ids = list(self.active[request])
            if self.used + len([i for i in ids if i not in self.position]) > self.buffer_capacity:
                self.full_slots.add(slot)
                continue
            self._append(ids)
            self._mark(slot, ids)

    # ----- scoring -----
    def logits(self, hidden: torch.Tensor, requests: list[str], full_logits) -> torch.Tensor:
        """Draft logits [R, V] for hidden [R, H], row r belonging to requests[r]: each row scores its own active ids,
        -inf elsewhere. `full_logits(hidden)` is the engine's own full-vocabulary head (used for rows over capacity).
        """
        self.flush()
        slots = [self.slot_of[r] for r in requests]
        n = self.used
        full = [k for k, s in enumerate(slots) if s in self.full_slots]
        self.stats.steps += 1
        self.stats.rows += len(slots)
        self.stats.full_rows += len(full)
        self.stats.active_sum += sum(self.vocab_size if s in self.full_slots else len(self.active[r])
                                     for r, s in zip(requests, slots))
        slot_index = torch.tensor(slots, dtype=torch.long, device=self.member.device)
        allowed = self.member[slot_index, :n]  # [R, n]
        if full:  # some row needs every id: score the full vocabulary once, then mask the other rows
            self.stats.scored_sum += self.vocab_size
            out = full_logits(hidden)
            mask = torch.ones(len(slots), out.shape[1], dtype=torch.bool, device=out.device)
            mask[:, self.buffer_ids[:n]] = ~allowed
            mask[full] = False
            return out.masked_fill(mask, float("-inf"))
        self.stats.scored_sum += n
        sub = hidden.to(self.buffer_rows.dtype) @ self.buffer_rows[:n].T  # [R, n]: the union's rows only
        sub = sub.masked_fill(~allowed, float("-inf"))
        out = sub.new_full((len(slots), self.vocab_size), float("-inf"))
        out[:, self.buffer_ids[:n]] = sub
        return out

    def contains(self, request: str, token_id: int) -> bool:
        slot = self.slot_of.get(request)
        return slot is not None and (slot in self.full_slots or token_id in self.active[request])

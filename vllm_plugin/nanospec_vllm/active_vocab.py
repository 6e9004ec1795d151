"""Per-request active vocabularies for a batch of drafts: one persistent buffer of lm-head rows on the device.

NanoSpec's draft lm head scores only the ids a request has already seen (temporal locality). In a serving engine
every running request has its own set, and one draft step scores a row per request, so this keeps

    buffer_ids  [C]       token ids whose lm-head rows have been gathered (the union over live requests, grown
                          incrementally: an id's row is copied once, when the first request needs it)
    buffer_rows [C, H]    those rows of the draft lm head, in buffer order
    member      [S+1, C]  request slot x buffer position: is the id active for that request (the last row is the
                          reserved set: the static core, or one draftable id when there is no core)
    slot_live   [S+1]     the slot holds a request with a non-empty restricted set

and one draft step is a single product over the buffer, then each row masked to its own set (scoring.py). A drafted
id is therefore always one of its request's own active ids, and verification by the target keeps the output exact.

The host decides, the device only receives writes. Host mirrors (`position`, `active`) say what is new without
reading the device; the writes of a step go out together in `flush` (one row gather, one membership scatter, the
few slots that changed), before the step's first product and outside any captured graph. The buffers are allocated
once and only written in place, so a CUDA graph captured over them stays valid through growth, rebuilds and weight
reloads. Slots are the runner's: Model Runner V2 passes its request-state index (the row -> slot map is then its own
device tensor), V1 leaves them to the free list here and gets the step's row -> slot map uploaded once per step.

Bounds. `capacity` ids per request and `buffer_capacity` entries in all. When the buffer fills it is rebuilt from
the live requests' sets (finished requests' rows dropped). Past a bound a V1 request drafts from the full vocabulary
(`full_slots`: the eager step can score it); under V2 (`fixed`) its set stops growing instead (`capped`), since one
captured graph cannot switch to the full head for some batches. An empty set (no core, nothing draftable seen) is
no restriction at all: V1 scores the full vocabulary for it, V2 the reserved set; never a row of all -inf.

Worked example (V = 10, core {0}): request a absorbs [5, 3, 5] -> buffer_ids [0, 5, 3], member[a] = [1, 1, 1];
request b absorbs [7] -> buffer_ids [0, 5, 3, 7], member[b] = [1, 0, 0, 1]. A step with rows (a, b) scores 4 rows of
the lm head instead of 10; row b's logits at ids 5 and 3 are -inf.
"""
from __future__ import annotations

import torch

from .rows import HeadRows
from .scoring import LogitTransform, score_fixed, score_union
from .stats import DraftStats

HEADROOM = 8  # a rebuild must leave buffer_capacity / HEADROOM entries free beyond the ids that asked for it


class ActiveVocab:
    """Active sets of up to `slots` live requests over a vocabulary of `vocab_size` target ids (module docstring).

    rows: a HeadRows (or the draft lm head's weight [V_draft, H], with `draft_index` [V] long: the row of each target
    id, -1 outside a pruned draft vocabulary; None for a full one). fixed: Model Runner V2's graph-safe form.
    """

    def __init__(self, rows, vocab_size: int, slots: int, core_ids=(), capacity: int = 8192,
                 buffer_capacity: int = 32768, draft_index: torch.Tensor | None = None, *, fixed: bool = False,
                 dtype: torch.dtype | None = None):
        if capacity < 1 or buffer_capacity < capacity:
            raise ValueError(f"need 1 <= capacity ({capacity}) <= buffer_capacity ({buffer_capacity})")
        self.rows = rows if isinstance(rows, HeadRows) else HeadRows(rows, vocab_size, draft_index)
        self.vocab_size, self.fixed = vocab_size, fixed
        weight = self.rows.weight
        device, hidden = weight.device, weight.shape[1]
        self.draftable = self.rows.draftable
        # The buffer never needs more entries than the head has rows (a pruned EAGLE-3 head: its d2t rows, ~32k of a
        # 152k vocabulary); V2 multiplies all of them every call, so sizing it from the target's vocabulary would
        # score more rows than vLLM's own head does.
        head_rows = vocab_size if self.draftable is None else len(self.draftable)
        self.buffer_capacity = max(1, min(buffer_capacity, head_rows))
        self.capacity = min(capacity, self.buffer_capacity)
        self.core = self._draftable(core_ids)
        if len(self.core) > capacity:
            raise ValueError(f"the static core ({len(self.core)} ids) does not fit the capacity {capacity}")
        with torch.inference_mode(False):  # normal tensors: writable inside vLLM's inference-mode steps and out
            self.buffer_ids = torch.arange(self.buffer_capacity, device=device)  # unused entry p: id p (scoring.py)
            self.buffer_rows = torch.zeros(self.buffer_capacity, hidden, dtype=dtype or weight.dtype, device=device)
            self.member = torch.zeros(slots + 1, self.buffer_capacity, dtype=torch.bool, device=device)
            self.slot_live = torch.zeros(slots + 1, dtype=torch.bool, device=device)
            self.slot_held = torch.zeros(slots + 1, dtype=torch.bool, device=device)  # a request holds the slot
            self.counters = torch.zeros(4, dtype=torch.long, device=device)  # V2: calls, rows, active ids, fallbacks
        self.reserved = slots
        self.used = 0  # buffer entries filled
        self.position: dict[int, int] = {}  # host mirror: token id -> buffer position
        self.active: dict[str, set[int]] = {}  # host mirror: request -> its active ids
        self.slot_of: dict[str, int] = {}
        self.free = list(range(slots - 1, -1, -1))
        self.full_slots: set[int] = set()  # V1: requests past a bound, full vocabulary
        self.capped: set[str] = set()  # V2: requests past a bound, set frozen
        self.pending_ids: list[int] = []  # buffer entries decided on the host, rows not gathered yet
        self.pending_marks: list[tuple[int, int]] = []  # (slot, buffer position) memberships not written yet
        self.pending_live: dict[int, bool] = {}  # slot -> slot_live value not written yet
        self.pending_held: list[int] = []  # slots taken by a request, slot_held not written yet
        self.stats = DraftStats()
        self.fallback = self.core or [self.rows.first_draftable()]  # the reserved set: never empty
        self._step: tuple[tuple, torch.Tensor] | None = None  # V1: this step's rows and their slots on the device
        self._append(self.fallback)
        self._mark(self.reserved, self.fallback)
        self.flush()

    # ----- growing the sets (host decides, device receives writes) -----
    def _draftable(self, ids) -> list[int]:
        unique = dict.fromkeys(int(i) for i in ids)
        return [i for i in unique if 0 <= i < self.vocab_size and (self.draftable is None or i in self.draftable)]

    def _append(self, ids: list[int]) -> None:
        """Give ids new to the buffer its next entries; their rows are gathered at the next flush."""
        new = [i for i in ids if i not in self.position]
        self.position.update((token, self.used + k) for k, token in enumerate(new))
        self.pending_ids += new
        self.used += len(new)

    def _mark(self, slot: int, ids) -> None:
        self.pending_marks += [(slot, self.position[i]) for i in ids]

    def _set_live(self, request: str) -> None:
        slot = self.slot_of[request]
        self.pending_live[slot] = bool(self.active[request]) and slot not in self.full_slots

    def _upload(self, values: list) -> torch.Tensor:
        """Host values -> a device tensor: pinned memory and a non-blocking copy on CUDA (no host stall). Called at
        a flush and once per step for the row map, never per draft position."""
        device = self.member.device
        if device.type == "cpu":
            return torch.tensor(values, dtype=torch.long)
        return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)

    def flush(self) -> None:
        """Apply what the host decided since the last flush to the device: the new buffer entries (ids and their
        lm-head rows, one gather), the new (slot, position) memberships (one scatter), the slots that changed."""
        if self.pending_ids:
            start = self.used - len(self.pending_ids)
            index = self._upload(self.pending_ids)
            self.buffer_ids[start:self.used] = index
            self.buffer_rows[start:self.used] = self.rows.gather(index).to(self.buffer_rows.dtype)
            self.pending_ids = []
        if self.pending_marks:
            marks = self._upload(self.pending_marks)  # [m, 2]
            self.member[marks[:, 0], marks[:, 1]] = True
            self.pending_marks = []
        for slot, live in self.pending_live.items():
            self.slot_live[slot] = live
        self.pending_live = {}
        for slot in self.pending_held:
            self.slot_held[slot] = True
        self.pending_held = []

    def admit(self, request: str, token_ids=(), slot: int | None = None) -> None:
        """A request enters with the ids known for it (prompt, and outputs when it resumes). `slot`: the runner's
        request-state index (V2); a request already there starts over (vLLM re-adds one whose input changed)."""
        self.release(request)
        if slot is None:
            if not self.free:
                raise RuntimeError(f"nanospec: more live requests than the {self.reserved} slots")
            slot = self.free.pop()
        else:
            holder = next((r for r, s in self.slot_of.items() if s == slot), None)
            if holder is not None:  # vLLM gave the index to a new request: the old one is gone
                self.release(holder)
            self.free.remove(slot)
        self.slot_of[request], self.active[request] = slot, set()
        self.pending_held.append(slot)
        self.stats.requests += 1
        self._grow(request, [*self.core, *self._draftable(token_ids)])
        self._set_live(request)

    def absorb(self, request: str, token_ids) -> None:
        """Add token ids (prompt, committed output) to `request`'s set, giving it a slot on first sight."""
        if request not in self.slot_of:
            self.admit(request, token_ids)
            return
        self._grow(request, self._draftable(token_ids))
        self._set_live(request)

    def _grow(self, request: str, ids: list[int]) -> None:
        slot, active = self.slot_of[request], self.active[request]
        if slot in self.full_slots or request in self.capped:
            return
        new = [i for i in dict.fromkeys(ids) if i not in active]
        if not new:
            return
        if len(active) + len(new) > self.capacity:
            if not self.fixed:  # bounded: this request falls back to the full vocabulary
                self.full_slots.add(slot)
                return
            new = new[:self.capacity - len(active)]
            self._cap(request)
        fresh = [i for i in new if i not in self.position]
        if self.used + len(fresh) > self.buffer_capacity:
            if self._worth_rebuilding(len(fresh)):
                self._rebuild()  # before `active` takes the new ids: they are counted once, below
                fresh = [i for i in new if i not in self.position]
            room = self.buffer_capacity - self.used
            if len(fresh) > room:  # the live union alone fills the buffer (or compacting it would not pay)
                if not self.fixed:
                    self.full_slots.add(slot)
                    return
                new = [i for i in new if i in self.position] + fresh[:room]
                self._cap(request)
        active.update(new)
        self._append(new)
        self._mark(slot, new)

    def _cap(self, request: str) -> None:
        if request not in self.capped:
            self.capped.add(request)
            self.stats.capped_requests += 1

    def release(self, request: str) -> None:
        """A finished (or preempted) request frees its slot; its rows stay in the buffer until the next rebuild."""
        slot = self.slot_of.pop(request, None)
        if slot is None:
            return
        self.stats.note_release(len(self.active.pop(request)))
        self.pending_marks = [mark for mark in self.pending_marks if mark[0] != slot]
        self.pending_live.pop(slot, None)
        self.pending_held = [held for held in self.pending_held if held != slot]
        self.member[slot].zero_()
        self.slot_live[slot] = False
        self.slot_held[slot] = False
        self.full_slots.discard(slot)
        self.capped.discard(request)
        self.free.append(slot)
        self._step = None

    def _worth_rebuilding(self, fresh: int) -> bool:
        """A rebuild re-gathers every live row, so it runs only when it frees room for the `fresh` ids plus an eighth
        of the buffer: at most one rebuild per buffer_capacity / 8 new entries, never one per step near capacity
        (a request that does not fit otherwise falls back, V1, or stops growing, V2, as after a futile rebuild)."""
        live = set(self.fallback)
        for request, slot in self.slot_of.items():
            if slot not in self.full_slots:
                live |= self.active[request]
        return len(live) + fresh + max(1, self.buffer_capacity // HEADROOM) <= self.buffer_capacity

    def _rebuild(self) -> None:
        """Compact the buffer to the reserved set plus the live requests' ids (finished requests' rows dropped)."""
        self.stats.rebuilds += 1
        self.used, self.position, self.pending_ids, self.pending_marks = 0, {}, [], []
        self.member.zero_()
        self._append(self.fallback)
        self._mark(self.reserved, self.fallback)
        for request, slot in self.slot_of.items():
            if slot in self.full_slots:
                continue
            ids = list(self.active[request])
            fresh = [i for i in ids if i not in self.position]
            room = self.buffer_capacity - self.used
            if len(fresh) > room:
                if not self.fixed:
                    self.full_slots.add(slot)
                    self.pending_live[slot] = False
                    continue
                ids = [i for i in ids if i in self.position] + fresh[:room]
                self.active[request] = set(ids)
                self._cap(request)
            self._append(ids)
            self._mark(slot, ids)

    def reload_rows(self, rows: HeadRows | None = None) -> None:
        """The lm head's weights changed (reloaded, shared, another tensor; with `rows`, maybe another d2t map):
        gather every entry in use again, in place, keeping every live request's set (what it saw is unchanged;
        only ids the new head cannot draft leave it)."""
        if rows is not None and rows.draftable != self.draftable:
            self.rows, self.draftable = rows, rows.draftable
            self.core = self._draftable(self.core)
            self.fallback = self.core or [rows.first_draftable()]
            for request in self.active:
                self.active[request] = set(self._draftable(self.active[request]))
                self._set_live(request)
            self._rebuild()
        elif rows is not None:
            self.rows = rows
        self.flush()
        if self.used:
            self.buffer_rows[:self.used] = self.rows.gather(self.buffer_ids[:self.used]).to(self.buffer_rows.dtype)

    # ----- scoring -----
    def prepare_rows(self, requests: list[str]) -> None:
        """The step's row -> slot map (V1), uploaded once and reused by each draft position of the step."""
        self._step = (tuple(requests), self._upload([self.slot_of[r] for r in requests]))

    def logits(self, hidden: torch.Tensor, requests: list[str], full_logits,
               transform: LogitTransform = LogitTransform()) -> torch.Tensor:
        """Draft logits [R, V] for hidden [R, H], row r belonging to requests[r]: each row scores its own active ids,
        -inf elsewhere. `full_logits(hidden)` is the engine's own full-vocabulary head (already scaled), used when a
        row has no restricted set (past a bound, or empty)."""
        self.flush()
        if self._step is None or self._step[0] != tuple(requests):
            self.prepare_rows(requests)
        slot_index = self._step[1]
        n = self.used
        full = [r for r in requests if self.slot_of[r] in self.full_slots or not self.active[r]]
        self.stats.steps += 1
        self.stats.rows += len(requests)
        self.stats.full_rows += len(full)
        self.stats.active_sum += sum(self.vocab_size if self.slot_of[r] in self.full_slots or not self.active[r]
                                     else len(self.active[r]) for r in requests)
        allowed = self.member[slot_index, :n]  # [R, n]
        if full:  # some row needs every id: score the full vocabulary once, then mask the other rows
            self.stats.scored_sum += self.vocab_size
            out = full_logits(hidden)
            mask = torch.ones(len(requests), out.shape[1], dtype=torch.bool, device=out.device)
            mask[:, self.buffer_ids[:n]] = ~allowed
            mask &= self.slot_live[slot_index].unsqueeze(1)  # rows without a restricted set: unmasked
            return out.masked_fill(mask, float("-inf"))
        self.stats.scored_sum += n
        return score_union(hidden, self.buffer_rows[:n], self.buffer_ids[:n], allowed, self.vocab_size, transform)

    def graph_logits(self, hidden: torch.Tensor, row_slots: torch.Tensor,
                     transform: LogitTransform = LogitTransform()) -> torch.Tensor:
        """V2 (fixed shapes, device-only): row r scores the set of request-state slot row_slots[r] (scoring.py)."""
        return score_fixed(hidden, self.buffer_rows, self.buffer_ids, self.member, self.slot_live, self.slot_held,
                           row_slots, self.vocab_size, transform, self.counters)

    def read_counters(self) -> None:
        """Fold the device counters of V2 draft calls into the stats (reads the device: at stats time only)."""
        calls, rows, active, fallback = self.counters.tolist()
        self.counters.zero_()
        self.stats.steps += calls
        self.stats.rows += rows
        self.stats.active_sum += active
        self.stats.fallback_rows += fallback
        self.stats.scored_sum += calls * self.buffer_capacity

    def contains(self, request: str, token_id: int) -> bool:
        slot = self.slot_of.get(request)
        if slot is None:
            return False
        if not self.active[request]:  # an empty set: V1 drafts from the full vocabulary, V2 from the reserved set
            return not self.fixed or token_id in self.fallback
        return slot in self.full_slots or token_id in self.active[request]

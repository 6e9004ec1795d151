"""SubsetLMHead: score only an active subset of the lm head's rows, kept in a persistent buffer.

The draft head's lm head is a [V, H] GEMM; with V = 151,936 it dominates draft time on a CPU (MODELS.md: ~13 ms
versus ~0.3 ms for 3k rows). FR-Spec (Zhao et al., 2025, arXiv:2502.14856) restricts it to the K most frequent
tokens; NanoSpec restricts it to tokens seen in the context. Both need the same structure, kept here:

    mask      bool  [V]            is target id v active?
    slot_of   long  [V]            its slot in the buffer, -1 when absent
    slot_ids  long  [capacity]     target id held by each slot, -1 when empty
    buffer    W.dtype [capacity, H]  buffer[s] = W[row_of_id[slot_ids[s]]]
    last_seen int32 [V]            clock of the last round id v was added or touched (LRU eviction)
    added_at  int32 [V]            clock of the round id v was (last) added
    tag       int8  [V]            caller's label of why id v was added (e.g. prompt / output), 0 = none
    pinned    bool  [V]            never evicted (static core, special ids)

Everything lives on the weight's device. `add(ids)` deduplicates on the device (a stable sort, no Python sets),
assigns free slots and queues the gather of only the new rows; `gather()` runs it, on CUDA on a side stream
with an event that `logits()` waits on, on CPU synchronously. Host syncs: `add` reads ONE scalar (the number of
new ids, so slot bookkeeping stays on the host as plain ints; a pinned add reads two, in one transfer).

`row_of_id` maps target ids to weight rows: identity for EAGLE-2 heads (the target's own lm head), the inverse of
an EAGLE-3 head's d2t map otherwise, -1 for ids outside the head's vocabulary (they are silently never added).
"""
from __future__ import annotations

import time

import torch

from ..decoding.host import read

_EMPTY = -1
_NEVER_EVICT = torch.iinfo(torch.int64).max


class SubsetLMHead:
    """A device-resident active set of lm-head rows with incremental gather and LRU eviction.

    >>> head = SubsetLMHead(torch.randn(100, 8), capacity=4)
    >>> head.add(torch.tensor([7, 3, 7]))          # 7 deduplicated on the device
    2
    >>> head.slot_ids[:2].tolist(), head.size
    ([7, 3], 2)
    """

    def __init__(self, weight: torch.Tensor, capacity: int, vocab_size: int | None = None,
                 row_of_id: torch.Tensor | None = None, buffer_dtype: torch.dtype | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.weight = weight  # [Vh, H], shared with the model, never copied in full
        self.device = weight.device
        self.capacity = capacity
        self.vocab_size = vocab_size if vocab_size is not None else weight.shape[0]
        V = self.vocab_size
        if row_of_id is None:
            if weight.shape[0] < V:
                raise ValueError(f"weight has {weight.shape[0]} rows for a vocabulary of {V}; pass row_of_id")
            row_of_id = torch.arange(V, device=self.device)
        # One extra sentinel entry at index V: invalid ids are redirected there, so every update below is a
        # plain scatter with no boolean indexing (which would sync the host to learn the output size).
        self._row_of_id = torch.cat([row_of_id.to(self.device, torch.long), torch.tensor([_EMPTY], device=self.device)])
        self._mask = torch.zeros(V + 1, dtype=torch.bool, device=self.device)
        self._slot_of = torch.full((V + 1,), _EMPTY, dtype=torch.long, device=self.device)
        self._pinned = torch.zeros(V + 1, dtype=torch.bool, device=self.device)
        self._last_seen = torch.zeros(V + 1, dtype=torch.int32, device=self.device)
        self._added_at = torch.zeros(V + 1, dtype=torch.int32, device=self.device)
        self._tag = torch.zeros(V + 1, dtype=torch.int8, device=self.device)
        self.slot_ids = torch.full((capacity,), _EMPTY, dtype=torch.long, device=self.device)
        # [capacity, H]; the weight's dtype unless told otherwise (float32 is faster than bf16 on AVX2-only CPUs)
        self.buffer = torch.zeros(capacity, weight.shape[1], dtype=buffer_dtype or weight.dtype, device=self.device)
        self.is_cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self.is_cuda else None
        self._event: torch.cuda.Event | None = None
        self.reset()

    # Public views without the sentinel entry: [V] each.
    mask = property(lambda self: self._mask[: self.vocab_size])
    slot_of = property(lambda self: self._slot_of[: self.vocab_size])
    last_seen = property(lambda self: self._last_seen[: self.vocab_size])
    pinned = property(lambda self: self._pinned[: self.vocab_size])

    @property
    def size(self) -> int:
        """Active ids now (host int, no sync)."""
        return self.used - self.holes

    def reset(self) -> None:
        """Empty the set (a new request). The buffer keeps its stale rows: they are unreachable."""
        self._mask.zero_()
        self._mask[-1] = True  # the sentinel counts as present, so it is never "new"
        self._slot_of.fill_(_EMPTY)
        self._pinned.zero_()
        self._last_seen.zero_()
        self._added_at.zero_()
        self._tag.zero_()
        self.slot_ids.fill_(_EMPTY)
        self.clock = 0  # bumped once per round by tick(); stamps recency
        self.used = 0  # slots [0, used) have been handed out; beyond is untouched
        self.holes = 0  # evicted slots inside [0, used) not yet reused
        self.num_pinned = 0
        self._free: list[torch.Tensor] = []  # device tensors of evicted slot indices, reused first
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (slots, weight rows) to gather
        self._event = None

    def tick(self) -> int:
        """Advance the recency clock (once per decoding round)."""
        self.clock += 1
        return self.clock

    def _sanitize(self, ids: torch.Tensor) -> torch.Tensor:
        """ids -> ids on the device, with ids outside [0, V) or outside the head's vocabulary sent to the sentinel V."""
        ids = ids.to(self.device, torch.long).reshape(-1)
        V = self.vocab_size
        in_range = (ids >= 0) & (ids < V)
        ids = torch.where(in_range, ids, V)
        return torch.where(self._row_of_id[ids] >= 0, ids, V)

    def tag_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tag int8, added_at int32) of each id; meaningful only where contains(ids)."""
        safe = self._sanitize(ids)
        return self._tag[safe].reshape(ids.shape), self._added_at[safe].reshape(ids.shape)

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        """Membership of each id now (ids outside the head vocabulary: False)."""
        ids = ids.to(self.device, torch.long)
        V = self.vocab_size
        safe = torch.where((ids >= 0) & (ids < V), ids, V)
        return self._mask[safe] & (safe < V)

    def touch(self, ids: torch.Tensor) -> None:
        """Stamp ids with the current clock (present or not; absent ids get stamped as they are added)."""
        self._last_seen.index_fill_(0, self._sanitize(ids), self.clock)

    def add(self, ids: torch.Tensor, pinned: bool = False, tags: torch.Tensor | int = 0) -> int:
        """Make ids active; returns how many were new. Evicts least-recently-seen unpinned ids on overflow.

        tags: a label per id (int8 codes, same shape as ids) or one for all, recorded for the new ids only.

        If more new ids arrive than can ever fit, those occurring LAST in `ids` are kept (callers put the most
        important, e.g. committed tokens, last); a kept id's tag is the one of its first occurrence.
        """
        ids = self._sanitize(ids)
        if ids.numel() == 0:
            return 0
        if isinstance(tags, torch.Tensor):
            tags = tags.to(self.device, torch.int8).reshape(-1)
        self._last_seen.index_fill_(0, ids, self.clock)
        # First occurrence of each id within the batch, found with a stable sort (sync-free).
        sorted_ids, order = torch.sort(ids, stable=True)
        first_sorted = torch.ones_like(sorted_ids, dtype=torch.bool)
        first_sorted[1:] = sorted_ids[1:] != sorted_ids[:-1]
        is_first = torch.empty_like(first_sorted).scatter_(0, order, first_sorted)
        is_new = is_first & ~self._mask[ids]
        present = is_first & self._mask[ids] & ~self._pinned[ids] & (ids < self.vocab_size)  # kept this round
        # THE host sync of a round, one transfer: how many ids are new and how many present unpinned ids this
        # batch protects from eviction; slot bookkeeping is then plain host arithmetic.
        (num_new, num_present), = read(torch.stack([is_new.sum(), present.sum()]))
        if pinned:  # once per request: present ids become pinned, then new ones must all fit
            if self.num_pinned + num_present + num_new > self.capacity:
                raise ValueError(f"{self.num_pinned + num_present + num_new} pinned ids exceed the capacity "
                                 f"of {self.capacity}")
            self._pinned.index_fill_(0, ids, True)
            self._pinned[-1] = False
            self.num_pinned += num_present
            num_present = 0
        if num_new == 0:
            return 0
        # Compact the new ids to the front, keeping their order: stable argsort of "not new".
        new_pos = torch.argsort((~is_new).to(torch.int32), stable=True)[:num_new]
        protect = ids
        if num_new > self.capacity - self.num_pinned - num_present:  # never for pinned adds (checked above)
            # The batch alone overflows: keep the capacity's worth of its unpinned ids, new OR already present,
            # whose LAST occurrence comes latest (callers put committed ids last; an id drafted early in the
            # batch and committed at its end ranks as committed). Present ids that lose lose their protection.
            run = torch.cumsum(first_sorted.to(torch.long), 0) - 1
            last_at = torch.zeros_like(order).scatter_reduce_(0, run, order, "amax")
            key = torch.empty_like(order).scatter_(0, order, last_at[run])  # per position: its id's last index
            candidates = (is_new | present).nonzero().squeeze(1)
            room = self.capacity - self.num_pinned
            kept = candidates[torch.argsort(key[candidates], stable=True)][max(0, candidates.numel() - room):]
            protect = ids[kept]
            new_pos = kept[is_new[kept]]
            num_new = int(new_pos.numel())
            if num_new == 0:
                return 0
        new_ids = ids[new_pos]
        overflow = num_new - (self.capacity - self.size)
        if overflow > 0:
            self.evict(overflow, protect=protect)
        slots = self._take_slots(num_new)
        self.slot_ids[slots] = new_ids
        self._slot_of[new_ids] = slots
        self._mask[new_ids] = True
        self._added_at[new_ids] = self.clock
        self._tag[new_ids] = tags[new_pos] if isinstance(tags, torch.Tensor) else tags
        self._pending.append((slots, self._row_of_id[new_ids]))
        if pinned:
            self.num_pinned += num_new
        return num_new

    def _take_slots(self, n: int) -> torch.Tensor:
        """n free slot indices: evicted holes first, then fresh slots at the end of the used range."""
        parts = []
        if self.holes:
            pool = torch.cat(self._free) if len(self._free) > 1 else self._free[0]
            take = min(n, self.holes)
            parts.append(pool[:take])
            self._free = [pool[take:]] if take < self.holes else []
            self.holes -= take
            n -= take
        if n:
            parts.append(torch.arange(self.used, self.used + n, device=self.device))
            self.used += n
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def evict(self, n: int, protect: torch.Tensor | None = None) -> torch.Tensor:
        """Remove the n least-recently-seen unpinned ids (never those in `protect`, sanitized ids of the batch
        being added); returns their (now free) slots."""
        evictable = self.size - self.num_pinned
        if n > evictable:
            raise ValueError(f"cannot evict {n} ids: only {evictable} unpinned ids are active")
        if n <= 0:
            return torch.empty(0, dtype=torch.long, device=self.device)
        held = self.slot_ids[: self.used]
        held_ids = torch.where(held >= 0, held, self.vocab_size)  # holes -> sentinel
        key = self._last_seen[held_ids].long()
        key = key.masked_fill(self._pinned[held_ids] | (held < 0), _NEVER_EVICT)
        if protect is not None:  # absent ids have slot -1: send them to a scratch entry past the end
            protect_slots = self._slot_of[protect]
            key = torch.cat([key, key.new_zeros(1)])
            key.index_fill_(0, torch.where(protect_slots >= 0, protect_slots, self.used), _NEVER_EVICT)
            key = key[: self.used]
        victims = torch.topk(key, n, largest=False, sorted=False).indices  # slots, oldest first-ish
        victim_ids = held[victims]
        self._mask[victim_ids] = False
        self._slot_of[victim_ids] = _EMPTY
        self.slot_ids[victims] = _EMPTY
        self._free.append(victims)
        self.holes += n
        return victims

    def gather(self) -> None:
        """Copy the queued new rows W[rows] into their buffer slots.

        CUDA: on a side stream that first waits for the main stream (the slot/row tensors and the previous
        round's reads of the buffer are queued there); an event marks completion and `wait()` makes the main
        stream wait on it, so the copy overlaps the head backbone. CPU: synchronously, right here.
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if self._stream is None:
            for slots, rows in pending:
                self.buffer.index_copy_(0, slots, self.weight.index_select(0, rows).to(self.buffer.dtype))
            return
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            for slots, rows in pending:  # in order: a slot reused twice ends with its latest id
                slots.record_stream(self._stream)
                rows.record_stream(self._stream)
                self.buffer.index_copy_(0, slots, self.weight.index_select(0, rows).to(self.buffer.dtype))
            self._event = torch.cuda.Event()
            self._event.record(self._stream)

    def wait(self) -> float:
        """Make the buffer safe to read; returns seconds the host spent (0 on CUDA: the main stream waits on the
        gather's event in the device queue, the host never blocks, and the copy overlaps whatever ran before)."""
        if self._pending:
            start = time.perf_counter()
            self.gather()
            return time.perf_counter() - start if self._stream is None else 0.0
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
            self._event = None
        return 0.0

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [m, H] -> logits [m, used] over the used slot range (empty slots: -inf), in the buffer dtype."""
        self.wait()
        out = hidden.to(self.buffer.dtype) @ self.buffer[: self.used].T  # [m, used]
        if self.holes:
            out = out.masked_fill(self.slot_ids[: self.used] < 0, float("-inf"))
        return out

    def slot_to_id(self, slots: torch.Tensor) -> torch.Tensor:
        """Buffer slots -> real target ids (empty slots -> 0, a placeholder that only -inf scores point at)."""
        return self.slot_ids[slots].clamp(min=0)

    def topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """log-softmax over the active set only (float32), top-k -> (logp [m, k], target ids [m, k])."""
        logp = torch.log_softmax(self.logits(hidden).float(), dim=-1)  # [m, used]
        return _topk_padded(logp, k, self.slot_to_id)

    def check_invariants(self) -> None:
        """Raise AssertionError unless mask, slot map, slot ids and buffer rows agree with the weight."""
        self.wait()
        V, used = self.vocab_size, self.used

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise AssertionError(what)

        need(0 <= self.size <= self.capacity and used <= self.capacity, "size/used out of bounds")
        need(bool(self._mask[V]) and not bool(self._pinned[V]), "sentinel entry corrupted")
        held = self.slot_ids[:used]
        occupied = held >= 0
        need(int((~occupied).sum()) == self.holes, "hole count disagrees with slot_ids")
        need(bool((self.slot_ids[used:] == _EMPTY).all()), "slots beyond the used range are not empty")
        occ_slots = torch.nonzero(occupied).reshape(-1)
        occ_ids = held[occ_slots]
        need(occ_ids.unique().numel() == occ_ids.numel(), "duplicate ids in slot_ids")
        need(int(self.mask.sum()) == self.size == occ_ids.numel(), "mask count disagrees with slots")
        need(bool(self.mask[occ_ids].all()), "a held id is not in the mask")
        need(bool((self._slot_of[occ_ids] == occ_slots).all()), "slot_of does not invert slot_ids")
        need(bool((self.slot_of[~self.mask] == _EMPTY).all()), "an absent id has a slot")
        need(bool((self._row_of_id[occ_ids] >= 0).all()), "an id outside the head vocabulary is held")
        need(bool((self.pinned <= self.mask).all()), "a pinned id is not active")
        need(int(self.pinned.sum()) == self.num_pinned, "pinned count disagrees")
        need(torch.equal(self.buffer[occ_slots], self.weight[self._row_of_id[occ_ids]].to(self.buffer.dtype)),
             "buffer rows disagree with the weight")
        if self.holes:
            free = torch.cat(self._free)
            need(free.numel() == self.holes and bool((self.slot_ids[free] == _EMPTY).all()), "free list is stale")


def resolve_buffer_dtype(choice: str, weight: torch.Tensor) -> torch.dtype:
    """VocabConfig.buffer_dtype -> a dtype. 'auto' and 'weight': the weight's (its dtype is the one the runtime
    probe measured fastest on this machine, machine.py); or a named dtype."""
    if choice in ("auto", "weight"):
        return weight.dtype
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if choice not in dtypes:
        raise ValueError(f"buffer_dtype must be 'auto', 'weight' or one of {sorted(dtypes)}, got {choice!r}")
    return dtypes[choice]


def _topk_padded(logp: torch.Tensor, k: int, to_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of logp [m, n] with ids mapped by to_ids; k > n pads with (-inf, id 0)."""
    m, n = logp.shape
    kk = min(k, n)
    values, cols = torch.topk(logp, kk, dim=-1) if kk else (logp[:, :0], logp[:, :0].long())
    ids = to_ids(cols)
    if kk < k:
        values = torch.cat([values, logp.new_full((m, k - kk), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_zeros((m, k - kk))], dim=1)
    return values, ids


def full_topk(weight: torch.Tensor, hidden: torch.Tensor, k: int,
              head_to_target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain EAGLE: the full lm-head GEMM, log-softmax (float32) and top-k mapped to target ids."""
    logp = torch.log_softmax((hidden.to(weight.dtype) @ weight.T).float(), dim=-1)  # [m, Vh]
    to_ids = (lambda cols: head_to_target[cols]) if head_to_target is not None else (lambda cols: cols)
    return _topk_padded(logp, k, to_ids)

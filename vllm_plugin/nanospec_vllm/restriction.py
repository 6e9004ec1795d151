"""The plugin's state inside one draft model: the requests' active sets, the step's row map, the staged commits.

The runner hooks (hooks.py) drive it; the draft model (model.py) asks it for logits. One engine step:

    V1  propose_draft_token_ids -> begin_v1: read back the last step's committed ids, release finished or preempted
        requests, admit new ones (their prompt, and their outputs when resumed), stage this step's sampled tokens,
        upload the row map, flush  -> the proposer's compute_logits calls (one per draft position) -> end_step
    V2  finish_requests -> release; add_requests -> admit (slot = request-state index); postprocess_sampled ->
        read back the last step's ids, stage this step's; speculator.propose -> begin_v2 (flush, count the calls
        the proposal makes) -> sample_draft (row map = the speculator's idx_mapping, on the device) -> compute_logits

The vocabulary is built from the lm head the model has when the first of these runs (after vLLM has shared the
target's head into the draft, after a dummy load that skipped load_weights), and its rows are gathered again
whenever the head's weight changes (a reload, or another tensor): the sets themselves are kept. Every method that
writes the device runs in inference mode, as vLLM's own steps do (a buffer made there can only be written there).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .active_vocab import ActiveVocab
from .committed import StagedTokens
from .rows import HeadRows
from .scoring import LogitTransform
from .stats import DraftStats

logger = logging.getLogger("vllm.nanospec")


@dataclass(frozen=True)
class Settings:
    """config.json "nanospec": {"static_core": [ids], "capacity": 8192, "buffer_capacity": 32768}."""

    static_core: tuple[int, ...] = ()
    capacity: int = 8192  # ids per request
    buffer_capacity: int = 32768  # lm-head rows held for all live requests (V2 scores all of them each call)
    log_every: int = 4096  # proposals between summary lines (V2: and reads of the device counters, one small sync)

    @classmethod
    def of(cls, config: dict | None) -> "Settings":
        config = dict(config or {})
        return cls(tuple(int(i) for i in config.get("static_core", [])), int(config.get("capacity", 8192)),
                   int(config.get("buffer_capacity", 32768)), int(config.get("log_every", 4096)))


class Restriction:
    """rows(): the HeadRows of the model's current lm head; transform(): its LogitTransform. A V2 draft call before
    the vocabulary exists (never, with the hooks in place) scores the full head and shows as a shortfall."""

    def __init__(self, settings: Settings, slots: int, vocab_size: int, runner: str,
                 rows: Callable[[], HeadRows], transform: Callable[[], LogitTransform],
                 dtype: torch.dtype | None = None):
        self.settings, self.slots, self.vocab_size, self.runner = settings, slots, vocab_size, runner
        self.dtype = dtype  # the logits' dtype (vLLM's head_dtype when it has one)
        self.fixed = runner == "v2"
        self._rows, self._transform = rows, transform
        self.vocab: ActiveVocab | None = None
        self.stats = DraftStats(runner=runner)
        self.fingerprint = None
        self.staged: list[StagedTokens] = []
        self.rows: list[str] | None = None  # V1: this step's batch, in row order
        self.row_slots: torch.Tensor | None = None  # V2: the speculator's row -> request-state map (device)
        self.in_proposal = False
        self.warned = False

    # ----- the vocabulary, from the head the model has now -----
    @torch.inference_mode()
    def ensure_built(self) -> ActiveVocab:
        rows = self._rows()
        if self.vocab is None:
            s = self.settings
            self.vocab = ActiveVocab(rows, self.vocab_size, self.slots, s.static_core, capacity=s.capacity,
                                     buffer_capacity=s.buffer_capacity, fixed=self.fixed, dtype=self.dtype)
            self.vocab.stats = self.stats
            self.fingerprint = rows.fingerprint()
        elif rows.fingerprint() != self.fingerprint:
            self.weights_changed(rows)
        return self.vocab

    @torch.inference_mode()
    def weights_changed(self, rows: HeadRows | None = None) -> None:
        """Gather every buffer row again from the current head (in place: captured graphs stay valid)."""
        if self.vocab is None:
            return
        rows = rows or self._rows()
        self.vocab.reload_rows(rows)
        self.fingerprint = rows.fingerprint()

    # ----- committed ids -----
    def stage(self, staged: StagedTokens | None) -> None:
        if staged is not None:
            self.staged.append(staged)

    @torch.inference_mode()
    def apply_staged(self) -> None:
        """Absorb the committed ids staged at earlier steps whose copies have landed (committed.py); a copy still
        running waits, with the steps after it (in order), for a later step: the host never waits on it."""
        vocab = self.ensure_built()
        staged, self.staged = self.staged, []
        for k, step in enumerate(staged):
            if not step.ready():
                self.staged = staged[k:] + self.staged
                self.stats.deferred_copies += 1
                return
            committed = step.resolve(self.vocab_size)
            if committed and self.runner == "v2":
                self.stats.sampled_steps += 1  # an engine step that sampled tokens: its propose should be hooked
            for request, ids in committed.items():
                if request in vocab.slot_of:
                    vocab.absorb(request, ids)
                    self.stats.commits += len(ids)

    @torch.inference_mode()
    def sampled_v2(self, staged: StagedTokens) -> None:
        """V2's postprocess_sampled (before the step's propose): absorb the earlier steps' ids, stage this step's, and
        flush. The propose wrapper flushes again; should it never run (a speculator that overrides propose), the
        sets still reach the device, and `unhooked_steps` counts the engine steps it missed (stats.shortfall)."""
        self.apply_staged()
        self.stage(staged)
        self.ensure_built().flush()
        if self.stats.sampled_steps and self.stats.sampled_steps % self.settings.log_every == 0:
            self.read_device()
            self.warn_if_short()

    @torch.inference_mode()
    def admit(self, request: str, token_ids, slot: int | None = None) -> None:
        self.ensure_built().admit(request, [int(t) for t in token_ids if int(t) >= 0], slot=slot)

    @torch.inference_mode()
    def release(self, requests) -> None:
        vocab = self.ensure_built()
        for request in requests:
            vocab.release(request)

    # ----- V1: one proposal -----
    @torch.inference_mode()
    def begin_v1(self, requests: list[str], history: Callable[[int], object], gone,
                 staged: StagedTokens | None) -> None:
        """requests: input_batch.req_ids; history(row): the ids the host holds for that row (prompt, and outputs
        when resumed; placeholders -1 are skipped); gone: finished or preempted ids; staged: this step's samples."""
        vocab = self.ensure_built()
        self.apply_staged()
        self.release(gone)
        present = set(requests)
        for row, request in enumerate(requests):
            if request not in vocab.slot_of:
                if not vocab.free:  # requests that left without a word (none in vLLM 0.32): the absent go first
                    self.release([r for r in list(vocab.slot_of) if r not in present])
                self.admit(request, history(row))
        self.stage(staged)
        vocab.flush()
        vocab.prepare_rows(requests)
        self.rows = list(requests)
        self.in_proposal = True
        if requests:
            self.stats.note_proposal(0)  # V1 counts each call of the proposal as it comes (logits)

    def end_step(self) -> None:
        self.rows, self.row_slots, self.in_proposal = None, None, False
        if self.runner == "v1":
            self.warn_if_short()
            self._maybe_summarise()

    # ----- V2: one proposal -----
    @torch.inference_mode()
    def begin_v2(self, calls: int, real: bool) -> None:
        """Before the speculator's propose (outside any graph): flush the host's decisions; count a real proposal's
        calls (1 + (k - 1) sample_draft calls, k = num_speculative_tokens; at least 1)."""
        self.ensure_built().flush()
        if real:
            self.stats.note_proposal(calls)
            if self.stats.proposals % self.settings.log_every == 0:
                self.read_device()  # the calls of this proposal are still to come: compare up to the last one
                self.stats.expected_calls -= calls
                self.warn_if_short()
                self._maybe_summarise()
                self.stats.expected_calls += calls

    def read_device(self) -> None:
        if self.vocab is not None and self.fixed:
            self.vocab.read_counters()

    # ----- scoring -----
    def logits(self, hidden: torch.Tensor, full_logits) -> torch.Tensor | None:
        """The restricted logits for this call, or None: no row map (the caller scores the full vocabulary)."""
        if self.row_slots is not None and self.vocab is not None:  # V2: the speculator's draft step (maybe captured)
            return self.vocab.graph_logits(hidden, self.row_slots[:hidden.shape[0]], self._transform())
        if self.rows is None or self.vocab is None:
            if self.in_proposal:  # a call the hooks did not map: counted against the restriction
                self.stats.expected_calls += 1
                self.stats.unrestricted_calls += 1
            else:
                self.stats.unmapped_steps += 1
            return None
        batch, count = len(self.rows), hidden.shape[0]
        if count == batch:
            requests = self.rows
        elif batch and count % batch == 0:  # parallel drafting: rows are request-major, count // batch each
            requests = [r for r in self.rows for _ in range(count // batch)]
        else:
            from .hooks import HookError

            raise HookError(f"nanospec: the draft step has {count} rows for {batch} requests; this vLLM orders draft "
                            "rows differently from 0.32.0 (see nanospec_vllm/hooks.py)")
        self.stats.expected_calls += 1
        return self.vocab.logits(hidden, requests, full_logits, self._transform())

    def _maybe_summarise(self) -> None:
        stats = self.stats
        if stats.proposals and stats.proposals % self.settings.log_every == 0:
            logger.info("nanospec: %d proposals, %d draft calls, restricted every draft step: %s, avg active %.0f, "
                        "lm-head rows per call %.0f, full-vocabulary rows %d", stats.proposals, stats.steps,
                        "yes" if stats.restricted_every_step else "NO", stats.to_json()["avg_active"],
                        stats.to_json()["avg_scored_rows"], stats.full_rows)

    def warn_if_short(self) -> None:
        line = self.stats.shortfall()
        if line and not self.warned:
            logger.warning(line)
            self.warned = True

    @torch.inference_mode()
    def stats_json(self) -> dict:
        self.read_device()
        live = len(self.vocab.slot_of) if self.vocab else 0
        return {**self.stats.to_json(), "live_requests": live, "buffer_used": self.vocab.used if self.vocab else 0,
                "buffer_capacity": self.vocab.buffer_capacity if self.vocab else 0}

    @torch.inference_mode()
    def reset_stats(self) -> None:
        self.read_device()
        self.stats = DraftStats(runner=self.runner)
        self.warned = False
        if self.vocab is not None:
            self.vocab.stats = self.stats

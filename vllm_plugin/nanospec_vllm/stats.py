"""The plugin's counters: what the draft lm head scored, and whether the restriction applied to every draft step.

A draft *call* is one call of the draft lm head for a batch of rows (one draft position of every request in the
batch); a *proposal* is the runner's draft routine for one engine step (num_speculative_tokens calls). The
conventions:

  * `expected_calls` counts the calls the hooked proposals make; `steps` the ones scored through the requests' active
    sets. `restricted_every_step` holds when a proposal was seen and every one of its calls was restricted: the
    check that catches a silent full-vocabulary run (a vLLM path the hooks do not reach).
  * Calls outside any proposal (the engine's warm-up, profiling and dummy runs) score the full vocabulary and are
    counted in `unmapped_steps`, not against the restriction.
  * Sizes are means over rows (`avg_active`: a row's own set, the full vocabulary for a row that fell back to it) or
    over calls (`avg_scored_rows`: lm-head rows multiplied per call: the buffer's union, its fixed capacity under
    Model Runner V2, or V when a call scored the full vocabulary).

Finished requests are folded into two running sums (`finished`, `finished_active_sum`): the counters stay a few
integers however long a server runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class DraftStats:
    runner: str = ""  # "v1" (GPUModelRunner.propose_draft_token_ids) or "v2" (the speculator's sample_draft)
    proposals: int = 0  # hooked draft routines with at least one request
    expected_calls: int = 0  # draft lm-head calls those proposals make
    steps: int = 0  # calls scored through the active sets
    unrestricted_calls: int = 0  # calls inside a proposal that had no row map (full vocabulary): should stay 0
    unmapped_steps: int = 0  # calls outside any proposal (warm-up, dummy runs): full vocabulary, not counted against
    rows: int = 0  # rows (request x draft position) scored through the active sets
    active_sum: int = 0  # sum over those rows of the row's own set size
    scored_sum: int = 0  # sum over restricted calls of lm-head rows multiplied
    full_rows: int = 0  # rows that drafted from the full vocabulary (V1: a set over capacity, or an empty set)
    fallback_rows: int = 0  # rows drafted from the reserved set (V2: an empty set, a padded row of a live batch)
    capped_requests: int = 0  # requests whose set stopped growing at the capacity (V2: the graph cannot fall back)
    rebuilds: int = 0  # buffer compactions
    requests: int = 0  # requests that got a slot
    finished: int = 0  # requests released
    finished_active_sum: int = 0  # sum of their final set sizes
    commits: int = 0  # committed ids read back from the device's sampled tokens
    deferred_copies: int = 0  # steps whose sampled-token copy had not landed yet: read a step later, never waited on
    sampled_steps: int = 0  # V2: engine steps that sampled tokens (each should be followed by a hooked proposal)

    def note_proposal(self, calls: int) -> None:
        self.proposals += 1
        self.expected_calls += calls

    def note_release(self, final_size: int) -> None:
        self.finished += 1
        self.finished_active_sum += final_size

    @property
    def unhooked_steps(self) -> int:
        """V2 engine steps that sampled tokens without a hooked proposal (the propose wrapper did not run)."""
        return max(self.sampled_steps - self.proposals, 0)

    @property
    def restricted_every_step(self) -> bool:
        return (self.proposals > 0 and self.unrestricted_calls == 0 and self.steps >= self.expected_calls
                and self.unhooked_steps == 0)

    def to_json(self) -> dict:
        rows = max(self.rows, 1)
        return {**asdict(self), "avg_active": self.active_sum / rows,
                "avg_scored_rows": self.scored_sum / max(self.steps, 1),
                "avg_final_active": self.finished_active_sum / max(self.finished, 1),
                "coverage": self.steps / max(self.expected_calls, 1), "unhooked_steps": self.unhooked_steps,
                "restricted_every_step": self.restricted_every_step}

    def shortfall(self) -> str | None:
        """One line when the restriction did not apply to every draft call of the proposals seen, or when engine steps
        drafted without a hooked proposal (None when neither, or before any step)."""
        if self.unhooked_steps:
            return (f"nanospec: the propose wrapper did not run in {self.unhooked_steps} engine steps of "
                    f"{self.sampled_steps} that sampled tokens ({self.runner} runner; a speculator overriding propose?"
                    " see nanospec_vllm/hooks.py): their draft calls were not checked against the restriction, and "
                    "the sets reached the device only at the sampled tokens' flush")
        if self.proposals == 0 or self.restricted_every_step:
            return None
        missed = max(self.expected_calls - self.steps, 0) + self.unrestricted_calls
        return (f"nanospec: the active-vocabulary restriction did not apply to {missed} of {self.expected_calls} "
                f"draft lm-head calls ({self.runner} runner, {self.proposals} proposals): those scored the full "
                "vocabulary")

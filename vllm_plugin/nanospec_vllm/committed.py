"""Committed token ids from the device's sampled tokens, read one engine step later without stalling the host.

Why not the host's token lists: with async scheduling (vLLM's default on CUDA) the runner books each sampled token
on the host as a placeholder, -1, that is never replaced (the real ids go to the scheduler through an async output
copy), so a set built from `token_ids_cpu` would never grow past prompt + core. The sampled tokens are on the
device before the draft step runs, in both runners:

    V1  propose_draft_token_ids(scheduler_output, sampled_token_ids [R, 1 + k] ...): row r is input_batch.req_ids[r],
        rejected positions hold -1, rows of partial prefills (discard_request_mask) hold no token;
    V2  postprocess_sampled(idx_mapping [R], sampled_tokens [R, 1 + k], num_sampled [R] ...): row r is request-state
        index idx_mapping[r] (-1: a padded row), its first num_sampled[r] tokens are committed.

A step's tokens are copied to pinned host memory with a non-blocking copy and an event behind it (`stage`), and read
at the next step (`resolve`), by when the copy has long finished: a committed token joins its request's set at the
next draft step, as it did when the host's lists were read. The host never waits on the device mid-step: `ready()`
asks the event (query, no wait), and a copy still running is left for a later step. On the
CPU the copy is synchronous and the event is not needed. The request of each row is fixed when the tokens are
staged (V2 reuses a freed index for a new request before the next step).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, object]:
    """A host copy of `tensor` (pinned, non-blocking, plus its event on CUDA)."""
    if tensor.device.type == "cpu":
        return tensor.detach().clone(), None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


@dataclass
class StagedTokens:
    """One step's sampled tokens on their way to the host. requests[r]: the request of row r (None: skip the row)."""

    requests: list
    tokens: torch.Tensor  # [R, W] on the host (being copied)
    counts: torch.Tensor | None  # [R] valid tokens per row (V2); None: every id >= 0 in the row (V1)
    row_states: torch.Tensor | None  # [R] request-state index per row (V2), mapped through `state_requests`
    state_requests: dict | None
    event: object = None

    def ready(self) -> bool:
        """The copy has landed (asked without waiting; always on the CPU)."""
        return self.event is None or bool(self.event.query())

    def resolve(self, vocab_size: int) -> dict[str, list[int]]:
        """{request: its committed ids of that step, in order}. Call once ready(): it does not wait."""
        tokens = self.tokens.numpy()
        counts = None if self.counts is None else self.counts.numpy()
        requests = self.requests
        if self.row_states is not None:
            requests = [self.state_requests.get(int(index)) if index >= 0 else None
                        for index in self.row_states.numpy()]
        committed: dict[str, list[int]] = {}
        for row, request in enumerate(requests[:tokens.shape[0]]):
            if request is None:
                continue
            ids = tokens[row] if counts is None else tokens[row, :max(int(counts[row]), 0)]
            ids = ids[(ids >= 0) & (ids < vocab_size)]
            if ids.size:
                committed.setdefault(request, []).extend(ids.tolist())
        return committed


def stage_v1(requests: list, sampled, discarded_rows) -> StagedTokens | None:
    """V1: `sampled` is the device tensor [R, 1 + k] (-1 at rejected positions) or, when vLLM drafts after its
    bookkeeping, the host lists of valid ids. `discarded_rows`: rows whose sampled token is thrown away."""
    discarded = set(int(r) for r in np.asarray(discarded_rows).reshape(-1)) if discarded_rows is not None else set()
    rows = [None if row in discarded else request for row, request in enumerate(requests)]
    if isinstance(sampled, torch.Tensor):
        host, event = _to_host(sampled)
        return StagedTokens(rows, host, None, None, None, event)
    if not sampled:
        return None
    width = max((len(ids) for ids in sampled), default=0)
    table = torch.full((len(sampled), max(width, 1)), -1, dtype=torch.long)
    for row, ids in enumerate(sampled):
        table[row, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    return StagedTokens(rows, table, None, None, None, None)


def stage_v2(idx_mapping: torch.Tensor, sampled: torch.Tensor, num_sampled: torch.Tensor,
             state_requests: dict) -> StagedTokens:
    """V2: rows by request-state index (mapped through a snapshot of the runner's index -> request id table)."""
    tokens, event = _to_host(sampled)
    counts, _ = _to_host(num_sampled[:sampled.shape[0]])
    states, last = _to_host(idx_mapping[:sampled.shape[0]])
    return StagedTokens([], tokens, counts, states, dict(state_requests), last or event)

"""EAGLE-3 draft model whose lm head scores each request's active vocabulary (NanoSpec) inside vLLM.

The proposer calls `compute_logits(hidden [R, H])` with one row per running request (per draft position); the runner
hook (hooks.install) has told the model beforehand which requests those rows are and what each has seen. Each request's
set is its prompt and committed ids plus the static core (the most frequent tokens of the tokenizer and its stop ids,
written into the head's config by `python -m nanospec_core export-head --nanospec-vllm`). The ids a request drafts
come from that set by construction; the target's top-k, which NanoSpec's own engine adds, is not exposed to the
drafter by vLLM (the sampler returns ids only), so it is left out. A committed token joins its request's set the next
step: vLLM drafts before it books the step's tokens on the host, and reading them earlier would cost a device sync.

Verification is vLLM's own: greedy drafts are accepted only where they equal the target's argmax, and sampled drafts
go through its rejection sampler with the restricted distribution as q, so the output keeps the target's
distribution either way. Settings, config.json "nanospec": {"static_core": [ids], "capacity": 8192,
"buffer_capacity": 32768}. Set NANOSPEC_VLLM_RECORD=1 to record, per drafted row, whether the chosen id was in the
request's set and what the full vocabulary's argmax would have been (tests; it reads the device every step).
"""
from __future__ import annotations

import os

import torch
from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

from .active_vocab import ActiveVocab
from .hooks import HookError


class NanoSpecEagle3LlamaForCausalLM(Eagle3LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = dict(getattr(self.config, "nanospec", None) or {})
        self.nanospec_settings = {"static_core": list(settings.get("static_core", [])),
                                  "capacity": int(settings.get("capacity", 8192)),
                                  "buffer_capacity": int(settings.get("buffer_capacity", 32768))}
        self.slots = vllm_config.scheduler_config.max_num_seqs
        self.vocab: ActiveVocab | None = None
        self.seen: dict[str, int] = {}  # request -> tokens already absorbed
        self.rows: list[str] | None = None  # this step's batch, in row order
        self.record = [] if os.environ.get("NANOSPEC_VLLM_RECORD") == "1" else None

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        self._build_vocab()
        return loaded

    def _build_vocab(self) -> None:
        weight = self.lm_head.weight
        vocab_size = self.config.vocab_size
        draft_index = None
        if self.draft_id_to_target_id is not None:  # pruned draft vocabulary: target id d + d2t[d] is row d
            rows = torch.arange(self.draft_id_to_target_id.shape[0], device=weight.device)
            draft_index = torch.full((vocab_size,), -1, dtype=torch.long, device=weight.device)
            draft_index[rows + self.draft_id_to_target_id.to(weight.device)] = rows
        self.vocab = ActiveVocab(weight, vocab_size, self.slots, self.nanospec_settings["static_core"],
                                 capacity=self.nanospec_settings["capacity"],
                                 buffer_capacity=self.nanospec_settings["buffer_capacity"], draft_index=draft_index)

    # ----- called by the runner hook around each draft step -----
    def nanospec_begin_step(self, batch: list[tuple[str, object]]) -> None:
        """Absorb what each request of the batch committed since its last step. A request that left the batch
        (finished, aborted or preempted) frees its slot; one that comes back rebuilds its set from its ids."""
        present = {request for request, _ in batch}
        for request in [r for r in self.seen if r not in present]:
            self.vocab.release(request)
            del self.seen[request]
        for request, token_ids in batch:
            start = self.seen.get(request, 0)
            new = token_ids[start:].tolist()
            if new and min(new) < 0:  # a placeholder for a token not yet on the host (async scheduling): stop there
                new = new[:next(k for k, token in enumerate(new) if token < 0)]
            self.vocab.absorb(request, new)
            self.seen[request] = start + len(new)
        self.rows = [request for request, _ in batch]

    def nanospec_end_step(self) -> None:
        self.rows = None

    # ----- the draft lm head -----
    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.rows is None or self.vocab is None:  # warm-up and dummy runs: no requests behind the rows
            if self.vocab is not None:
                self.vocab.stats.unmapped_steps += 1
            return super().compute_logits(hidden_states)
        batch, rows = len(self.rows), hidden_states.shape[0]
        if rows == batch:
            requests = self.rows
        elif batch and rows % batch == 0:  # parallel drafting: rows are request-major, rows // batch per request
            requests = [r for r in self.rows for _ in range(rows // batch)]
        else:
            raise HookError(f"nanospec: the draft step has {rows} rows for {batch} requests; this vLLM orders draft "
                            "rows differently from 0.32.0 (see nanospec_vllm/hooks.py)")
        logits = self.vocab.logits(hidden_states, requests, super().compute_logits)
        scale = getattr(self.logits_processor, "scale", 1.0)
        if scale != 1.0:
            logits = logits * scale
        if self.record is not None:
            self._record(hidden_states, requests, logits)
        return logits

    def _record(self, hidden_states, requests, logits) -> None:
        chosen = logits.argmax(-1).tolist()
        unrestricted = super().compute_logits(hidden_states).argmax(-1).tolist()
        for request, token, full in zip(requests, chosen, unrestricted):
            self.record.append({"request": request, "draft": token, "in_set": self.vocab.contains(request, token),
                                "full_argmax": full, "full_in_set": self.vocab.contains(request, full)})

    # ----- read by LLM.collective_rpc (hooks.worker_stats / worker_reset) -----
    def nanospec_stats(self) -> dict:
        stats = self.vocab.stats.to_json() if self.vocab else {}
        live = [len(ids) for ids in self.vocab.active.values()] if self.vocab else []
        return {**stats, "live_requests": len(live), "buffer_used": self.vocab.used if self.vocab else 0,
                "record": self.record}

    def nanospec_reset(self) -> None:
        if self.vocab is not None:
            self.vocab.stats = type(self.vocab.stats)()
        if self.record is not None:
            self.record.clear()

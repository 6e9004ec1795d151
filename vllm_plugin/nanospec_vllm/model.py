"""EAGLE-3 draft model whose lm head scores each request's active vocabulary (NanoSpec) inside vLLM.

The proposer (V1) or the speculator (V2) calls `compute_logits(hidden [R, H])` (or `get_top_tokens`, with
use_local_argmax_reduction) with one row per running request per draft position; the runner hooks (hooks.py) have
told the model's Restriction beforehand which requests those rows are. Each request's set is its prompt and
committed ids plus the static core (the most frequent tokens of the tokenizer and its stop ids, written into the
head's config by `python -m nanospec_core export-head --nanospec-vllm`). The ids a request drafts come from that set
by construction; the target's top-k, which NanoSpec's own engine adds, is not exposed to the drafter by vLLM (the
sampler returns ids only), so it is left out. A committed token joins its request's set at the next draft step
(committed.py: read back from the device's sampled tokens, which async scheduling never books on the host).

Verification is vLLM's own: greedy drafts are accepted only where they equal the target's argmax, and sampled drafts
go through its rejection sampler with the restricted distribution as q, so the output keeps the target's
distribution either way. Settings, config.json "nanospec": {"static_core": [ids], "capacity": 8192,
"buffer_capacity": 32768}. Set NANOSPEC_VLLM_RECORD=<folder> to record, per drafted row (eager V1 steps only: it
reads the device every call), the request, how many ids vLLM had committed for it, the drafted id, its logit and the
full head's logits: the tests recompute each row's expected set and draft from those, outside the plugin.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

from . import hooks
from .restriction import Restriction, Settings
from .rows import HeadRows, draft_index_of
from .scoring import LogitTransform

logger = logging.getLogger("vllm.nanospec")
UNQUANTIZED = ("UnquantizedEmbeddingMethod", "UnquantizedLinearMethod")


class NanoSpecEagle3LlamaForCausalLM(Eagle3LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        runner = hooks.runner_mode(vllm_config)  # an unsupported mode stops here, with one line
        self.nanospec = Restriction(Settings.of(getattr(self.config, "nanospec", None)),
                                    vllm_config.scheduler_config.max_num_seqs, self.config.vocab_size, runner,
                                    rows=self._nanospec_rows, transform=self._nanospec_transform,
                                    dtype=getattr(self.logits_processor, "head_dtype", None))
        self._rows_cache: HeadRows | None = None
        record = os.environ.get("NANOSPEC_VLLM_RECORD")
        self.record = {"folder": record, "rows": [], "full": [], "step": []} if record else None
        logger.info(hooks.describe(runner, vllm_config))

    # ----- the lm head vLLM ended up with -----
    def _nanospec_rows(self) -> HeadRows:
        if self._rows_cache is None:
            head = self.lm_head
            method = type(getattr(head, "quant_method", None)).__name__
            if getattr(head, "quant_method", None) is not None and method not in UNQUANTIZED:
                raise hooks.refuse(f"a quantized draft lm head ({method})", "an unquantized lm head for the draft")
            shard, all_reduce = None, None
            if getattr(head, "tp_size", 1) > 1:  # vocab-parallel: this rank holds a shard of the draft rows
                from vllm.distributed import tensor_model_parallel_all_reduce

                indices = head.shard_indices
                shard, all_reduce = (indices.org_vocab_start_index, indices.org_vocab_end_index), \
                    tensor_model_parallel_all_reduce
            index = draft_index_of(self.draft_id_to_target_id, self.config.vocab_size, head.weight.device)
            self._rows_cache = HeadRows(lambda: self.lm_head, self.config.vocab_size, index, shard, all_reduce)
        return self._rows_cache

    def _nanospec_transform(self) -> LogitTransform:
        return LogitTransform.of(self.logits_processor)

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        self.nanospec_weights_changed()  # a reload: the sets stay, their rows are gathered again
        return loaded

    def nanospec_build(self) -> None:
        """After the proposer's load_model (hooks): vLLM has shared the target's lm head into the draft by now."""
        self._rows_cache = None
        self.nanospec.ensure_built()

    def nanospec_weights_changed(self) -> None:
        self._rows_cache = None
        self.nanospec.weights_changed()

    # ----- the draft lm head -----
    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        full = super().compute_logits
        logits = self.nanospec.logits(hidden_states, full)
        if logits is None:  # warm-up and dummy runs: no requests behind the rows
            return full(hidden_states)
        if self.record is not None and self.nanospec.row_slots is None and not _capturing():
            self._record(hidden_states, logits, full(hidden_states))
        return logits

    def get_top_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.nanospec.logits(hidden_states, super().compute_logits)
        if logits is None:
            return super().get_top_tokens(hidden_states)
        return logits.argmax(dim=-1)

    # ----- NANOSPEC_VLLM_RECORD -----
    def nanospec_record_step(self, rows: list[tuple[str, int, list]]) -> None:
        """hooks.v1_begin: per row of this step, the request, how many ids vLLM has committed for it, and the first
        ids of its prompt (to find the prompt outside the engine)."""
        self.record["step"] = rows

    def _record(self, hidden_states, logits, full) -> None:
        rows = self.record["step"]
        repeat = hidden_states.shape[0] // max(len(rows), 1)
        chosen = logits.argmax(-1).tolist()
        for k, token in enumerate(chosen):
            request, committed, prompt_head = rows[k // repeat]
            self.record["rows"].append({"request": request, "committed": committed, "prompt_head": prompt_head,
                                        "draft": token, "draft_logit": float(logits[k, token]),
                                        "full_logit": float(full[k, token])})
        self.record["full"].append(full.detach().float().cpu())

    def _write_record(self) -> str | None:
        if not self.record or not self.record["rows"]:
            return None
        path = Path(self.record["folder"]) / f"record-{os.getpid()}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"rows": self.record["rows"], "full": torch.cat(self.record["full"])}, path)
        return str(path)

    # ----- read by LLM.collective_rpc (hooks.worker_stats / worker_reset) -----
    def nanospec_stats(self) -> dict:
        stats = self.nanospec.stats_json()
        line = self.nanospec.stats.shortfall()
        if line:
            logger.warning(line)
        return {**stats, "record_file": self._write_record(),
                "record_rows": len(self.record["rows"]) if self.record else 0}

    def nanospec_reset(self) -> None:
        self.nanospec.reset_stats()
        if self.record is not None:
            self.record.update(rows=[], full=[])


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

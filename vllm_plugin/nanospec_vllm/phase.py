"""One engine, one measured phase: start vLLM with a given draft (or none), decode the prompts, report.

    python -m nanospec_vllm.phase spec.json result.json

Each phase runs in its own process (the benchmark and the tests start one per configuration), so engines never share
a process and a crash in one configuration cannot spoil another's figures. spec.json:
  model, draft (folder or null), method ('ngram': vLLM's prompt lookup instead of a draft, prompt_lookup_min/_max
  its match lengths, default 1..4), num_speculative_tokens, dtype, max_model_len, batches (requests in flight, one
  measurement each; 1 decodes the prompts one after another, b > 1 submits them in waves of b), batch1_prompts
  (batch 1 decodes only the first n: the slow, latency-bound case), max_num_seqs (default: the largest batch;
  smaller makes requests join as others finish), prompts (token-id lists) or chats (message lists, templated by vLLM),
  max_tokens (one for all, or one per prompt: requests leave at different steps), temperature, seed, eager,
  draft_sample_method, warmup (prompts decoded first), logprobs (2: also report each position's top-2 logit
  margin, to judge differences between configurations), gpu_memory_utilization (CUDA builds; absent: vLLM's own)
result.json, per batch: outputs (token ids per prompt), new_tokens, wall_s, tokens_per_s, spec (vLLM's own counters: drafts,
  draft_tokens, accepted, acceptance_length = 1 + accepted / drafts, counting the bonus token as NanoSpec does),
  nanospec (the plugin's counters per worker: the runner in use, whether the restriction applied to every draft
  step, active-set sizes, rows scored; absent for other drafts).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def engine_env(kv_cache_gib: int = 2) -> dict:
    """Environment for a CPU engine process: Intel's OpenMP preloaded (the CPU build links it; without the preload
    the embedded target failed to start), no core reserved for the engine loop (vLLM's default reserves one: half of
    a 2-core machine), a bounded KV cache, and pickled RPC: `LLM.collective_rpc` sends the plugin's counter
    functions (hooks.worker_stats) to the worker, which vLLM serialises only with pickle allowed (our own processes
    on this machine). Values already set by the user win."""
    import os

    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "HF_HUB_OFFLINE": "1",
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists():
        env["LD_PRELOAD"] = str(iomp)
    return {**env, **{key: os.environ[key] for key in env if key in os.environ}}


def top2_margin(position: dict) -> float | None:
    """logprob(first) - logprob(second) at one position = the raw logit margin (the normaliser cancels)."""
    values = sorted((entry.logprob for entry in position.values()), reverse=True)
    return values[0] - values[1] if len(values) > 1 else None


def spec_counters(llm) -> dict:
    """vLLM's speculative-decoding counters (its metrics reader; disable_log_stats must be False)."""
    names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "accepted"}
    found = {value: 0 for value in names.values()}
    for metric in llm.get_metrics():
        if metric.name in names:
            found[names[metric.name]] += int(getattr(metric, "value", 0))
    return found


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    speculative = None
    if spec.get("method") == "ngram":  # vLLM's own prompt lookup: no draft model, matches of 1..4 context tokens
        speculative = {"method": "ngram", "num_speculative_tokens": spec.get("num_speculative_tokens", 3),
                       "prompt_lookup_min": spec.get("prompt_lookup_min", 1),
                       "prompt_lookup_max": spec.get("prompt_lookup_max", 4)}
    elif spec.get("draft"):
        speculative = {"method": "eagle3", "model": spec["draft"],
                       "num_speculative_tokens": spec.get("num_speculative_tokens", 3),
                       "draft_sample_method": spec.get("draft_sample_method", "greedy")}
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "bfloat16"), max_model_len=spec.get("max_model_len", 2048),
              max_num_seqs=spec.get("max_num_seqs") or max(max(spec["batches"]), 1), seed=spec.get("seed", 0),
              enforce_eager=spec.get("eager", True), speculative_config=speculative, disable_log_stats=False,
              skip_tokenizer_init="prompts" in spec,
              **({"gpu_memory_utilization": spec["gpu_memory_utilization"]}  # CUDA: the GPU's share; CPU: the
                 if spec.get("gpu_memory_utilization") else {}))  # KV cache is VLLM_CPU_KVCACHE_SPACE (engine_env)
    max_tokens = spec.get("max_tokens", 128)

    def params_for(tokens: int):  # seeded by the engine (no per-request seed: vLLM 0.32's CPU sampler cannot rewind
        # a seeded generator after a partial prefill)
        return SamplingParams(temperature=spec.get("temperature", 0.0), max_tokens=tokens,
                              ignore_eos=spec.get("ignore_eos", False), logprobs=spec.get("logprobs"))

    def sampling(batch):  # one SamplingParams for all, or one per prompt (max_tokens given per prompt)
        return [params_for(max_tokens[k]) for k, _ in batch] if isinstance(max_tokens, list) else params_for(max_tokens)

    if "prompts" in spec:
        inputs = [(k, TokensPrompt(prompt_token_ids=ids)) for k, ids in enumerate(spec["prompts"])]

        def decode(batch):
            return llm.generate([prompt for _, prompt in batch], sampling(batch), use_tqdm=False)
    else:
        inputs = list(enumerate(spec["chats"]))

        def decode(batch):
            return llm.chat([chat for _, chat in batch], sampling(batch), use_tqdm=False)

    for prompt in inputs[:spec.get("warmup", 0)]:  # first-call costs (allocations, kernels) before the clock
        decode([prompt])
    return {str(batch): measure(llm, decode, inputs, batch, speculative is not None, spec.get("batch1_prompts"))
            for batch in spec["batches"]}


def measure(llm, decode, inputs: list, batch: int, speculative: bool, batch1_prompts: int | None = None) -> dict:
    """Decode the inputs with `batch` requests in flight (1: the first `batch1_prompts` one after another) and read
    the counters."""
    from .hooks import worker_reset, worker_stats

    before = spec_counters(llm) if speculative else {}
    if speculative:
        llm.collective_rpc(worker_reset)
    started = time.perf_counter()
    if batch <= 1:  # one request at a time: the latency-bound case
        outputs = [decode([prompt])[0] for prompt in inputs[:batch1_prompts or len(inputs)]]
    else:  # waves of `batch` submitted together (max_num_seqs is the largest batch: a smaller one fills it only
        # in waves); a wave's requests leave as they finish
        outputs = [output for start in range(0, len(inputs), batch) for output in decode(inputs[start:start + batch])]
    wall = time.perf_counter() - started
    token_ids = [list(output.outputs[0].token_ids) for output in outputs]
    new_tokens = sum(map(len, token_ids))
    result = {"outputs": token_ids, "new_tokens": new_tokens, "wall_s": wall, "tokens_per_s": new_tokens / wall}
    if outputs and outputs[0].outputs[0].logprobs:  # top-2 margin per position: how close each greedy choice was
        result["margins"] = [[top2_margin(position) for position in output.outputs[0].logprobs]
                             for output in outputs]
    if speculative:
        after = spec_counters(llm)
        counters = {key: after[key] - before.get(key, 0) for key in after}
        counters["acceptance_length"] = 1 + counters["accepted"] / max(counters["drafts"], 1)
        result["spec"] = counters
        workers = [stats for stats in llm.collective_rpc(worker_stats) if stats]
        if workers:
            result["nanospec"] = workers
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

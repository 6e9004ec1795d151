"""The torch and transformers surface that NanoSpec's CUDA paths (and this check) use, probed on the running versions.

The lent GPU machine has torch 2.11 (CUDA 13) and transformers 5.17, CI torch 2.13 (CPU) and transformers 5.23 (and
5.17 in .venv-compat). Each entry below was reviewed against the earliest version it needs ("since"); every one is
older than torch 2.11 / transformers 5.17, so none is a 2.13-only API. The probes run each one on this device (a
tiny call, with the keyword arguments the code passes), so a version without it fails here by name rather than deep
inside a decode. CUDA-only entries are skipped on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .report import Context

LENT_TORCH, LENT_TRANSFORMERS = "2.11", "5.17"


def _tensor(device):
    return torch.arange(6, device=device)


def _sdpa(device):  # target.py: GQA without an explicit mask (one token, prefill), explicit mask for trees
    q, kv = torch.randn(1, 4, 3, 8, device=device), torch.randn(1, 2, 5, 8, device=device)
    F.scaled_dot_product_attention(q, kv, kv, is_causal=False, enable_gqa=True, scale=0.3)
    F.scaled_dot_product_attention(q, kv.repeat_interleave(2, 1), kv.repeat_interleave(2, 1),
                                   attn_mask=torch.ones(3, 5, dtype=torch.bool, device=device)[None, None])


def _graph(device):
    x = torch.ones(4, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = x * 2
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x * 2
        assert torch.cuda.is_current_stream_capturing()
    graph.replay()
    return y


def _side_stream(device):  # subset_head.gather / wait
    stream, x = torch.cuda.Stream(), torch.zeros(4, 2, device=device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        slots = torch.arange(2, device=device)
        slots.record_stream(stream)
        x.index_copy_(0, slots, torch.ones(2, 2, device=device))
        event = torch.cuda.Event()
        event.record(stream)
    torch.cuda.current_stream().wait_event(event)
    timed = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    timed[0].record()
    timed[1].record()
    timed[1].synchronize()
    timed[0].elapsed_time(timed[1])
    torch.tensor([1, 2], pin_memory=True).to(device, non_blocking=True)
    torch.cuda.set_sync_debug_mode("warn")
    torch.cuda.set_sync_debug_mode("default")


def _contexts(device):  # models/eagle.py, this check, nanospec_vllm/active_vocab.py
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        torch.zeros(1)
    with torch.inference_mode():
        with torch.inference_mode(False):
            torch.zeros(1).add_(1)


def _profiler(device):
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities):
        torch.ones(2, device=device).sum()


# (api, since, where it is used, probe(device), cuda only)
APIS = [
    ("F.scaled_dot_product_attention(enable_gqa=, scale=, attn_mask=)", "torch 2.5", "models/target.py", _sdpa, False),
    ("torch.sort / argsort(stable=True)", "torch 1.13", "decoding/tree.py, vocab/subset_head.py",
     lambda d: (torch.sort(_tensor(d), stable=True), torch.argsort(_tensor(d), stable=True)), False),
    ("Tensor.scatter_reduce_(reduce='amax', include_self=)", "torch 1.13", "nanospec_vllm/scoring.py, subset_head.py",
     lambda d: torch.zeros(3, device=d).scatter_reduce_(0, _tensor(d) % 3, _tensor(d).float(), "amax",
                                                         include_self=True), False),
    ("Tensor.index_fill_ / index_copy_ / topk(sorted=False)", "torch 1.x", "vocab/subset_head.py",
     lambda d: _tensor(d).index_fill_(0, _tensor(d)[:2], 0).float().topk(2, sorted=False), False),
    ("torch.random.fork_rng(devices=[]), torch.device as a context, inference_mode(False) inside inference mode",
     "torch 2.0", "models/eagle.py, nanospec_vllm/active_vocab.py, this check", _contexts, False),
    ("torch.utils.weak.WeakTensorKeyDictionary", "torch 2.0", "models/cpu_layout.py",
     lambda d: torch.utils.weak.WeakTensorKeyDictionary(), False),
    ("torch.cuda.Stream / Event(enable_timing) / wait_event / record_stream / pinned non_blocking copy, "
     "set_sync_debug_mode", "torch 1.10", "vocab/subset_head.py, decoding/host.py + request.py, nanospec_vllm",
     _side_stream, True),
    ("torch.cuda.CUDAGraph / graph / is_current_stream_capturing", "torch 1.10",
     "nanospec_vllm/model.py (V2 capture), this check", _graph, True),
    ("torch.profiler.profile(CPU, CUDA) + export_chrome_trace", "torch 1.8.1", "this check (overlap)", _profiler, True),
]


def _transformers_probe() -> list[dict]:
    """The transformers surface target.py / eagle.py read from HF modules, on a tiny Qwen2 and Llama layer."""
    import transformers
    from transformers.models.llama import modeling_llama as llama

    rows = []

    def probe(name, fn):
        try:
            fn()
            rows.append({"api": name, "ok": True, "detail": ""})
        except Exception as error:  # noqa: BLE001 - reported by name
            rows.append({"api": name, "ok": False, "detail": f"{type(error).__name__}: {error}"[:200]})

    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    probe("AutoModelForCausalLM.from_config(dtype=), Qwen2Config(rope_theta=)", lambda: model)
    probe("decoder layer: self_attn.{q,k,v,o}_proj, head_dim, scaling; norms; mlp",
          lambda: (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, attn.head_dim, attn.scaling,
                   model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm,
                   model.model.layers[0].mlp, model.model.norm, model.model.embed_tokens, model.lm_head))
    probe("model.model.rotary_emb(x, position_ids) -> (cos, sin)",
          lambda: model.model.rotary_emb(torch.zeros(1, 3, 32), torch.arange(3)[None]))
    llama_config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=64)
    probe("llama.LlamaDecoderLayer(config, 0), LlamaRMSNorm, LlamaRotaryEmbedding(config)",
          lambda: (llama.LlamaDecoderLayer(llama_config, 0), llama.LlamaRMSNorm(32, eps=1e-6),
                   llama.LlamaRotaryEmbedding(llama_config)))
    return rows


def compat_section(ctx: Context) -> None:
    import transformers

    ctx.figure("torch", torch.__version__)
    ctx.figure("transformers", transformers.__version__)
    ctx.figure("lent machine (documented)", f"torch {LENT_TORCH} (CUDA 13), transformers {LENT_TRANSFORMERS}")
    rows = []
    for name, since, where, probe, cuda_only in APIS:
        if cuda_only and not ctx.cuda:
            rows.append({"api": name, "since": since, "used in": where, "result": "skipped (CUDA only)"})
            continue
        try:
            probe(ctx.device)
            result = "ok"
        except Exception as error:  # noqa: BLE001 - every API is reported by name
            result = f"FAILED {type(error).__name__}: {error}"[:200]
        rows.append({"api": name, "since": since, "used in": where, "result": result})
        ctx.check(f"torch: {name}", result == "ok", result)
    ctx.figure("torch APIs (none needs a version newer than the lent machine's)", rows)
    for row in _transformers_probe():
        ctx.check(f"transformers: {row['api']}", row["ok"], row["detail"])
    ctx.figure("torch 2.13-only APIs found in the CUDA paths", "none (see the table)")

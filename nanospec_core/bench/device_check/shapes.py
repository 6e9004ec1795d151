"""The check's shapes (the embedded target's, or small ones for --quick), the models built from them, and the two
timing tools every section shares: a median timer and a step that is replayed from a CUDA graph where there is one.

Nothing is downloaded: targets are random-weight models built from configs in code (the embedded Qwen2.5-0.5B
shape: hidden 896, 24 layers, vocabulary 151,936); the draft-side timings at that shape use the head the repository
ships (assets/heads/qwen2.5-coder-0.5b-instruct/eagle3), a random head of the same architecture elsewhere.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

from ...models.eagle import random_head
from ...models.target import TargetModel
from ...paths import shipped_head_dir


@dataclass(frozen=True)
class CheckShape:
    """One run's sizes. Full: the embedded target's shape; quick: small enough for a 2-core CPU in CI."""

    hidden: int  # target hidden size (896: Qwen2.5-0.5B)
    layers: int  # target decoder layers (24)
    heads: int  # attention heads / kv heads (14 / 2)
    kv_heads: int
    intermediate: int  # MLP width (4864)
    vocabs: tuple[int, ...]  # draft-cost vocabularies: the embedded 151,936 and Gemma-3's 262,144
    dtype: torch.dtype  # timing dtype (bf16 on a GPU; float32 on the CPU, where bf16 is emulated on AVX2)
    prompt: int  # prompt tokens before the timed rounds
    new_tokens: int  # tokens decoded per timed run (random weights: about one round per token)
    tree: tuple[int, int, int]  # (depth, top_k, total_tokens): EAGLE-2's GPU preset in full mode
    verify_sizes: tuple[int, ...]  # tree sizes whose verify cost is measured
    capacity: int  # NanoSpec's active-set capacity (VocabConfig.capacity)
    plugin_buffer: int  # the plugin's buffer_capacity (V2 scores all of it per call)
    plugin_capacity: int  # ids per request in the plugin
    repeats: int  # timed repeats per median


FULL = CheckShape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocabs=(151936, 262144),
                  dtype=torch.bfloat16, prompt=200, new_tokens=48, tree=(6, 10, 60),
                  verify_sizes=(1, 8, 16, 32, 60, 128), capacity=4096, plugin_buffer=32768, plugin_capacity=8192,
                  repeats=30)
QUICK = CheckShape(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, vocabs=(4096, 8192),
                   dtype=torch.float32, prompt=24, new_tokens=10, tree=(3, 4, 7), verify_sizes=(1, 8, 16),
                   capacity=512, plugin_buffer=256, plugin_capacity=96, repeats=5)


def qwen2_target(shape: CheckShape, vocab: int, device: str, dtype: torch.dtype, seed: int = 0) -> TargetModel:
    """A random Qwen2 target of `shape` with `vocab` ids, built directly on the device (no host copy of the weights).
    Weights are scaled up from the init's 0.02 so argmaxes are clear (float32 greedy comparisons)."""
    import transformers

    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                      num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
                                      rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(config)
    return TargetModel(model.to(dtype).eval().requires_grad_(False))


def draft_head(target: TargetModel, shape: CheckShape, vocab: int):
    """The shipped EAGLE-3 head where it fits the target (the embedded shape), else a random EAGLE-3 head of the same
    architecture with the target's lm head (tied, as the shipped one is). Returns (head, where it came from)."""
    from ...models.eagle_checkpoint import load_head

    folder = shipped_head_dir("qwen2.5-coder-0.5b-instruct", "eagle3")
    if shape.hidden == 896 and shape.layers == 24 and vocab == 151936 and (folder / "config.json").is_file():
        return load_head(str(folder), target), f"shipped ({folder.name})"
    return random_head(target, "eagle3", seed=0, tied_lm_head=True), "random eagle3 (tied lm head)"


def models(ctx, vocab: int):
    """(target, head) at the check's shape with `vocab` ids, built once per run (one such target on the device at a
    time); ctx.cache[("where", vocab)] says which head it is."""
    key = ("target", vocab)
    if key not in ctx.cache:
        for old in [k for k in ctx.cache if k[0] == "target"]:
            del ctx.cache[old]
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
        target = qwen2_target(ctx.shapes, vocab, ctx.device, ctx.shapes.dtype)
        head, where = draft_head(target, ctx.shapes, vocab)
        ctx.cache[key] = (target, head)
        ctx.cache[("where", vocab)] = where
    return ctx.cache[key]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of fn(): CUDA events on a GPU (no host stall between), the host clock on a CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


class Replayable:
    """fn() over fixed input tensors, captured once in a CUDA graph (`graphed`) or run eagerly on each replay.

    `out` is the captured output (a graph writes it in place at every replay; eagerly it is rewritten with copy_),
    so a caller reads the same tensor either way. Capture follows PyTorch's recipe: warm up on a side stream, then
    record under torch.cuda.graph (which captures on its own stream)."""

    def __init__(self, fn, graphed: bool):
        self.fn, self.graphed = fn, graphed
        if not graphed:
            self.out = fn()
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()

    def replay(self):
        if self.graphed:
            self.graph.replay()
        else:
            fresh = self.fn()
            for dst, src in zip(_tensors(self.out), _tensors(fresh)):
                dst.copy_(src)
        return self.out


def _tensors(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]

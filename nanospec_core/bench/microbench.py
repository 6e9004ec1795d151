"""Microbenchmark: the subset lm head (NanoSpec's active set) against the full-vocabulary top-k, random weights."""
from __future__ import annotations

import statistics
import time

import torch

from ..vocab.subset_head import SubsetLMHead, full_topk, resolve_buffer_dtype


def _median_ms(fn, repeats: int, sync) -> float:
    """Median wall time of fn() in ms after one warm-up, synchronizing the device before each clock read."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.no_grad()
def microbench(sizes=(256, 512, 1024, 2048, 4096, 8192), H: int = 896, V: int = 151936, m: int = 10,
               dtype: torch.dtype = torch.bfloat16, buffer_dtype: str = "auto", repeats: int = 20,
               seed: int = 0) -> list[tuple[int, float, float]]:
    """Median ms of subset top-k vs full-vocabulary top-k (GEMM + log-softmax + top-k) on random weights.

    dtype: the lm-head weight's; buffer_dtype: the subset buffer's, as VocabConfig.buffer_dtype.

    Returns rows (active size, subset ms, full ms); the full cost does not depend on the size: measured once.
    """
    gen = torch.Generator().manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weight = torch.randn(V, H, generator=gen).to(device, dtype)
    hidden = torch.randn(m, H, generator=gen).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    full_ms = _median_ms(lambda: full_topk(weight, hidden, 10), max(3, repeats // 4), sync)
    rows = []
    for size in sizes:
        head = SubsetLMHead(weight, capacity=size, buffer_dtype=resolve_buffer_dtype(buffer_dtype, weight))
        head.add(torch.randperm(V, generator=gen)[:size])
        head.gather()
        subset_ms = _median_ms(lambda: head.topk(hidden, 10), repeats, sync)
        rows.append((size, subset_ms, full_ms))
    return rows

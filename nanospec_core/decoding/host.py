"""Device -> host reads: every one a decode round makes goes through `read`, so there are few and they are counted.

On a GPU each read waits for the device queue to drain, so a round that reads a scalar per tree level, per
verified node and per policy update stalls the pipeline a dozen times. The rule: a round reads the device only
where Python must branch on a value, and then several tensors in ONE transfer. A greedy NanoSpec round makes
four (tests/test_host_reads.py counts them on the CPU, where every Python conversion of a tensor is caught):
  1. the reranked tree's valid node count and its ancestor-closure check       (tree.py, _rerank)
  2. the target's argmax at every verified node with the tree's layout         (verify.py, verify_greedy)
  3. how many committed / drafted ids are new to the active set                (subset_head.py, add)
  4. the round's statistics: hits and origins of the committed tokens          (engine.py)
Lossless sampling reads per visited node (the walk branches on each draw); the coverage fallback adds one.
The other direction, host lists to the device, goes through `to_device` (pinned memory, non-blocking on CUDA).
"""
from __future__ import annotations

import torch


class ReadCount:
    """How many reads have been made (a process-wide counter that tests reset and compare)."""

    value = 0


def read(*tensors: torch.Tensor) -> list[list]:
    """Several tensors -> Python lists (flattened), in one device-to-host transfer.

    They are joined in float64 when any is floating (exact for ids below 2**53), else int64; each list comes
    back in its own tensor's kind (bools as bools, integers as ints).
    """
    ReadCount.value += 1
    flat = [t.reshape(-1) for t in tensors]
    joined_dtype = torch.float64 if any(t.is_floating_point() for t in flat) else torch.int64
    values = torch.cat([t.to(joined_dtype) for t in flat]).tolist() if flat else []
    out, start = [], 0
    for t in flat:
        part = values[start:start + t.numel()]
        start += t.numel()
        if t.dtype == torch.bool:
            part = [bool(v) for v in part]
        elif not t.is_floating_point():
            part = [int(v) for v in part]
        out.append(part)
    return out


def to_device(values: list[int], device: torch.device, dtype=torch.long) -> torch.Tensor:
    """A host list as a device tensor: on CUDA staged in pinned memory and copied without blocking the host."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)

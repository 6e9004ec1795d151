"""Tensor-parallel ranks as threads in lockstep (no vLLM, no torch.distributed): a fake all-reduce that sums what
every rank contributes, for the tests of the vocab-parallel row gather (main suite and the plugin's own)."""
from __future__ import annotations

import threading


class LockstepAllReduce:
    """all_reduce = LockstepAllReduce(2); rank r calls all_reduce.of(r)(local) and gets the sum over ranks."""

    def __init__(self, ranks: int, timeout: float = 60):
        self.barrier, self.parts, self.ranks = threading.Barrier(ranks, timeout=timeout), {}, ranks

    def of(self, rank: int):
        def reduce(local):
            self.parts[rank] = local
            self.barrier.wait()
            total = sum(self.parts[r] for r in range(self.ranks))
            self.barrier.wait()  # nobody overwrites a part before every rank has summed
            return total
        return reduce

    def abort(self) -> None:
        self.barrier.abort()

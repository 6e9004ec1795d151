"""Cost curves the tree shape depends on: one target forward over n new tokens after a cached context.

Verifying a tree of n nodes costs one target forward over n + 1 tokens; on a GPU that is nearly flat in n, on a
2-core CPU it is not, so the best tree is smaller there. `python -m nanospec_core costs` prints the curve.
"""
from __future__ import annotations

import statistics

import torch

from .decoding.engine import Clock
from .models.target import TargetModel


def forward_cost_ms(target: TargetModel, new_tokens: int, context: int = 200, repeats: int = 5,
                    with_logits: bool = True) -> float:
    """Median ms of one forward of `new_tokens` tokens (tree-masked, as verification runs) after `context` cached."""
    clock = Clock(target.device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.vocab_size, (context + new_tokens,), generator=generator).to(target.device)
    cache = target.new_cache(context + new_tokens)
    target.forward(ids[:context], cache)
    cache.commit()
    mask = torch.ones(new_tokens, new_tokens, dtype=torch.bool, device=target.device).tril()
    times = []
    for i in range(repeats + 1):  # the first run warms up
        start = clock()
        out = target.forward(ids[context:], cache, tree_mask=mask)
        if with_logits:
            target.logits(out.hidden)
        cache.discard()
        if i:
            times.append((clock() - start) * 1e3)
    return statistics.median(times)


def verification_curve(target: TargetModel, sizes=(1, 16, 32, 64), context: int = 200) -> list[tuple[int, float]]:
    return [(n, forward_cost_ms(target, n, context)) for n in sizes]

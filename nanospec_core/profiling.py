"""Cost curves the tree shape depends on: one target forward over n new tokens after a cached context.

Verifying a tree of n nodes costs one target forward over n + 1 tokens; on a GPU that is nearly flat in n, on a
2-core CPU it is not, so the best tree is smaller there. `python -m nanospec_core costs` prints the curve.
"""
from __future__ import annotations

import statistics

import torch

from .decoding.request import Clock
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


DRAFT_ROWS = 2048  # active rows assumed when timing a draft level: NanoSpec's average set is ~1.4-2k ids
VERIFY_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)  # tree tokens (root included) timed for the tree chooser
LEVEL_SIZES = (1, 2, 4, 8, 16)  # rows per draft level timed


def draft_level_ms(target: TargetModel, head, rows: int, context: int = 200, repeats: int = 5,
                   active_rows: int = DRAFT_ROWS) -> float:
    """Median ms of one draft level over `rows` nodes: a head step after `context` cached pairs, then the
    log-softmax top-k over `active_rows` lm-head rows (NanoSpec's subset), as build_tree runs it."""
    import torch.nn.functional as F

    clock = Clock(target.device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.vocab_size, (context + rows,), generator=generator).to(target.device)
    # [n, H] features: what a draft level reads (its parent's output) for EAGLE-2 and EAGLE-3 alike
    features = torch.randn(context + rows, target.hidden_size, generator=generator).to(target.device, head.dtype)
    cache = head.new_cache(context + rows)
    with torch.inference_mode():
        head.forward(ids[:context], features[:context], cache)
        cache.commit()
        subset = head.lm_head_weight[:active_rows].contiguous()
        mask = torch.ones(rows, rows, dtype=torch.bool, device=target.device).tril()
        times = []
        for i in range(repeats + 1):
            start = clock()
            hidden = head.forward(ids[context:], features[context:], cache, tree_mask=mask)
            F.linear(head.lm_input(hidden).to(subset.dtype), subset).float().log_softmax(-1).topk(min(10, rows))
            cache.discard()
            if i:
                times.append((clock() - start) * 1e3)
    return statistics.median(times)


def timed_rounds(steps, skip: int = 2) -> list[dict]:
    """Drive a decode (an iterator of StepStats) and time each round from outside: the wall time between rounds
    holds the draft, the verify and the engine's bookkeeping (commit, vocabulary update, statistics). Round 0 (the
    prefill) and the next `skip` warm-up rounds are left out."""
    import time

    rows, start = [], time.perf_counter()
    for step in steps:
        now = time.perf_counter()
        if step.round > skip:
            rows.append({"tree_size": step.tree_size, "draft_ms": step.draft_ms, "verify_ms": step.verify_ms,
                         "wall_ms": (now - start) * 1e3, "accepted": step.accepted})
        start = time.perf_counter()
    return rows


def round_overhead_ms(rows: list[dict], predicted_round_ms: float) -> float:
    """What the cost model leaves out of a round: the median measured round minus the predicted draft + verify."""
    return statistics.median(row["wall_ms"] for row in rows) - predicted_round_ms


def tree_costs(target: TargetModel, head) -> dict[str, dict[int, float]]:
    """The two cost curves the tree chooser reads: {'verify': {tokens: ms}, 'level': {rows: ms}}."""
    return {"verify": {n: forward_cost_ms(target, n) for n in VERIFY_SIZES},
            "level": {n: draft_level_ms(target, head, n) for n in LEVEL_SIZES}}

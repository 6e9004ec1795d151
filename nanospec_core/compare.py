"""Several methods on one prompt, run round by round in alternation, so none steals the CPU from the others.

The app's lanes (plain decoding, plain EAGLE, EAGLE + NanoSpec) need all runs live at once. Running them in threads
would make them fight over the same cores and spoil every timing; running one after the other would keep the user
waiting three times. Instead ONE generator calls `next()` on the `Session.stream` generators in turn: each round
runs alone on the machine, and each run's clock counts only the time spent inside its own `next()` calls (its
prefill included), so tokens/s stay comparable.

    for snap in compare_runs(session, session.encode("Write a quicksort."), GenerationConfig(max_new_tokens=64)):
        print(" | ".join(trace.text for trace in snap.traces))
    # snap.done once all finished; snap["nanospec"] is one method's trace; first_difference(a, b) at temperature 0

Closing the generator (Stop in the app, or an abandoned client) closes every inner generator right away, which
frees their KV caches and vocabulary buffers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .config import GenerationConfig, TreeConfig, VocabConfig
from .decoding.request import Clock
from .metrics import RunSummary, StepStats, summarize

# The app's lanes: the target alone (our KV-cached loop, one token per forward), plain EAGLE-2 (full-vocabulary
# draft lm head) and EAGLE-2 + NanoSpec. The first is the reference every speedup and equality check is against.
# With copies on, both EAGLE lanes also draft spans copied from the context (decoding/copy_draft.py): the same
# treatment, so EAGLE against NanoSpec still measures the vocabulary alone.
DEFAULT_METHODS = ("vanilla", "eagle", "nanospec")
COPY_LANES = ("vanilla", "eagle+copy", "nanospec+copy")


def lanes(copies: bool) -> tuple[str, str, str]:
    """The app's three lanes: the reference, EAGLE, EAGLE + NanoSpec (each with copy branches if `copies`)."""
    return COPY_LANES if copies else DEFAULT_METHODS


@dataclass
class RunTrace:
    """One method's run so far: its rounds, committed ids, and the wall time spent in its own rounds."""

    method: str
    steps: list[StepStats] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    wall_s: float = 0.0  # sum of this run's next() calls only: the other run's rounds are not counted
    finished: bool = False
    text: str = ""

    @property
    def rounds(self) -> list[StepStats]:
        """Draft/verify rounds (round 0, the prefill, left out)."""
        return [s for s in self.steps if s.round > 0]

    def summary(self) -> RunSummary:
        return summarize(self.steps, self.wall_s)


@dataclass
class Snapshot:
    """After each alternation: every method's trace (live objects, updated in place) and what changed."""

    traces: tuple[RunTrace, ...]
    new_steps: dict[str, StepStats]  # method -> the round it produced in this alternation

    def __getitem__(self, method: str) -> RunTrace:
        return next(trace for trace in self.traces if trace.method == method)

    @property
    def done(self) -> bool:
        return all(trace.finished for trace in self.traces)


def _advance(trace: RunTrace, stream: Iterator[StepStats], clock) -> StepStats | None:
    """Run one round of `stream` and account for it in `trace`; None once the stream is exhausted."""
    start = clock()
    step = next(stream, None)
    trace.wall_s += clock() - start
    if step is None:
        trace.finished = True
        return None
    trace.steps.append(step)
    trace.token_ids.extend(step.tokens)
    trace.finished = step.finished
    return step


def compare_runs(session, prompt_ids: torch.Tensor, gen: GenerationConfig, tree: TreeConfig | None = None,
                 vocab: VocabConfig | None = None, methods: tuple[str, ...] = DEFAULT_METHODS,
                 decode_text: bool = True) -> Iterator[Snapshot]:
    """Alternate one round of each method (the first of them rotating) until all finish; yield a Snapshot after
    every alternation, its traces in `methods` order.

    Every stream is created (head and vocabulary policy set up) before any clock starts. With decode_text the
    traces' `text` is refreshed for the methods that advanced.
    """
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct, got {methods}")
    tree, vocab = tree or session.tree_choice().tree, vocab or VocabConfig()
    clock = Clock(session.target.device)

    traces = [RunTrace(method) for method in methods]
    streams = []
    try:
        for method in methods:
            streams.append(session.stream(method, prompt_ids, gen, tree, vocab))
        pairs, turn = list(zip(traces, streams)), 0
        while not all(trace.finished for trace in traces):
            new_steps, first = {}, turn % len(pairs)
            turn += 1
            # The first round of an alternation follows the caller's work on the snapshot (building and sending an
            # update, a client parsing it on the same cores): who goes first rotates, so no lane always pays for it.
            for trace, stream in pairs[first:] + pairs[:first]:
                if trace.finished:
                    continue
                step = _advance(trace, stream, clock)
                if step is not None:
                    new_steps[trace.method] = step
                    if decode_text:
                        trace.text = session.decode(trace.token_ids)
            yield Snapshot(tuple(traces), new_steps)
    finally:
        for stream in streams:  # GeneratorExit into the engine loops: their caches are released now
            close = getattr(stream, "close", None)
            if close is not None:
                close()


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where the id lists differ (a length difference counts), None if equal.

    >>> first_difference([1, 2, 3], [1, 2, 4]), first_difference([1, 2], [1, 2, 5]), first_difference([7], [7])
    (2, 2, None)
    """
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_margin(target, prompt_ids: torch.Tensor, prefix: list[int]) -> tuple[float, int, int]:
    """Target's next-token logits after prompt + prefix (fresh cache, logits in float32): (top1 - top2, top1 id,
    top2 id). At a greedy divergence a margin of a few bf16 steps says: a near-tie decided by rounding order."""
    ids = torch.cat([prompt_ids.to(target.device), torch.tensor(prefix, dtype=torch.long, device=target.device)])
    cache = target.new_cache(ids.numel() + 1)
    hidden = target.forward(ids, cache).hidden[-1:]  # [1, H]
    values, indices = target.logits(hidden)[0].topk(2)
    return float(values[0] - values[1]), int(indices[0]), int(indices[1])

"""What every decode loop shares (speculative, plain, transformers' generate, the comparisons and the profiler):
the request, the device-synchronising clock, the next-token choice and the cut at a stop id or the token limit."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import GenerationConfig
from .verify import sample_token


class Clock:
    """Wall clock that synchronizes the device first, so GPU work is counted where it was issued: for whole runs
    and cost curves. Inside a round the engine times with Spans, which never stalls the device."""

    def __init__(self, device: torch.device):
        cuda = torch.device(device).type == "cuda"
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)

    def __call__(self) -> float:
        self._sync()
        return time.perf_counter()


class Spans:
    """Named time spans within one round. On CUDA each mark is an event recorded in the current stream (no host
    wait); `resolve()` waits for the last mark once and reads every span. On the CPU marks are host times.

        spans = Spans(device); start = spans.mark(); ...; spans.add("verify", start); ms = spans.resolve()
    Spans of one name accumulate (the head's backbone runs once per tree level).
    """

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.pending: list[tuple[str, object, object]] = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, name: str, start) -> None:
        self.pending.append((name, start, self.mark()))

    def resolve(self) -> dict[str, float]:
        """Milliseconds per name (one device wait on CUDA); clears the spans."""
        totals: dict[str, float] = {}
        if self.pending and self.cuda:
            self.pending[-1][2].synchronize()
        for name, start, end in self.pending:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            totals[name] = totals.get(name, 0.0) + ms
        self.pending.clear()
        return totals


@dataclass
class Request:
    """What one decode needs besides the models: the prompt, the limits, the ids that end generation."""

    prompt_ids: torch.Tensor  # [P]
    gen: GenerationConfig
    stop_ids: frozenset[int]

    def generator(self, device) -> torch.Generator | None:
        if self.gen.temperature <= 0:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.gen.seed)
        return g


def choose(logits: torch.Tensor, request: Request, generator) -> int:
    """The target's next token from logits [V]: argmax when greedy, else a sample at the request's temperature."""
    if request.gen.temperature <= 0:
        return int(logits.argmax())
    return sample_token(logits, request.gen.temperature, generator)


def clip_tokens(tokens: list[int], produced: int, request: Request) -> tuple[list[int], bool]:
    """Cut a round's committed tokens at the first stop id (kept) or at max_new_tokens; say whether we are done."""
    budget = request.gen.max_new_tokens - produced
    for i, token in enumerate(tokens[:budget]):
        if request.gen.stop_on_eos and token in request.stop_ids:
            return tokens[: i + 1], True
    clipped = tokens[:budget]
    return clipped, produced + len(clipped) >= request.gen.max_new_tokens

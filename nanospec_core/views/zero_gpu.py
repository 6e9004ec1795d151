"""How long a ZeroGPU call asks to hold the GPU, sized from the request.

On a ZeroGPU Space the GPU exists only inside functions decorated with `@spaces.GPU(duration=...)`; the call is
stopped at its duration (60 s when none is given), and shorter requests go ahead in the queue. `spaces` takes a
callable for the duration, called with the same arguments as the decorated function, so each handler asks for what
its own request needs:

    compare:   SETUP_S + LANES * max_new_tokens * TOKEN_S
    benchmark: SETUP_S + prompts * (methods + 1 warm-up) * max_new_tokens * TOKEN_S,
               prompts = (the categories picked, or all) * prompts per category
both clamped to [MIN_S, MAX_S]. SETUP_S and TOKEN_S are allowances, not measurements: no ZeroGPU run has been timed
yet (per-token time on a GPU is set by the Python round loop, not the 0.5B model's arithmetic). A bad argument asks
for MAX_S rather than fail: the handler itself reports the bad input.
"""
from __future__ import annotations

from .ui import DEFAULTS

LANES = 3  # plain decoding, plain EAGLE, EAGLE + NanoSpec: each generates max_new_tokens
SETUP_S = 20.0  # allowance: the first call moves the model to the GPU, loads the head, warms the kernels
TOKEN_S = 0.05  # allowance per generated token and lane (a round loop step on the GPU, with its host reads)
MIN_S = 15  # below this the setup alone could run out
MAX_S = 120  # an unauthenticated visitor's daily ZeroGPU quota is 2 minutes: a longer call could never start
SPEC_BENCH_CATEGORIES = 13  # what "none = all" means in the Benchmark tab


def clamp(seconds: float) -> int:
    return int(min(max(seconds, MIN_S), MAX_S))


def compare_seconds(prompt=None, model=None, max_new_tokens=DEFAULTS["max_new_tokens"], *settings, **named) -> int:
    """The compare handler's duration: three lanes of max_new_tokens each."""
    try:
        tokens = int(named.get("max_new_tokens", max_new_tokens))
        return clamp(SETUP_S + LANES * tokens * TOKEN_S)
    except (TypeError, ValueError):
        return MAX_S


def benchmark_seconds(categories=None, limit=1, max_new_tokens=64, methods=(), *settings, **named) -> int:
    """The benchmark handler's duration: every method (and one warm-up) on every prompt picked."""
    try:
        prompts = (len(categories or ()) or SPEC_BENCH_CATEGORIES) * int(limit)
        return clamp(SETUP_S + prompts * (len(methods or ()) + 1) * int(max_new_tokens) * TOKEN_S)
    except (TypeError, ValueError):
        return MAX_S

"""The vLLM plugin's Model Runner V2 scoring (vllm_plugin/nanospec_vllm: active_vocab.ActiveVocab(fixed=True),
scoring.score_fixed), with torch only: vLLM records the speculator's draft step as one FULL CUDA graph, so the
restricted head is captured once here and replayed while the sets change under it, grow (a new request), overflow
(a request capped at its capacity) and are rebuilt (the buffer compacted). Every replay is checked against the eager
call and against an oracle: the full lm head (float32) masked by each row's set, recomputed from what each request
absorbed, outside the plugin. On a CPU the same calls run eagerly (no graph), so CI runs the same sequence.

It also checks that the plugin's torch-only modules import where vLLM is absent (the lent GPU machine has none).
"""
from __future__ import annotations

import subprocess
import sys

import torch

from ...paths import REPO
from .report import Context
from .shapes import Replayable, median_ms

TORCH_ONLY = ("scoring", "active_vocab", "rows", "stats", "committed", "restriction")
NO_VLLM = ("import sys\nclass NoVllm:\n    def find_spec(self, name, path=None, target=None):\n"
           "        if name == 'vllm' or name.startswith('vllm.'):\n"
           "            raise ImportError('vllm is absent here (the check blocks it)')\n"
           "sys.meta_path.insert(0, NoVllm())\nsys.path.insert(0, {path!r})\n")


def import_check(ctx: Context) -> None:
    code = NO_VLLM.format(path=str(REPO / "vllm_plugin")) + "".join(
        f"import nanospec_vllm.{name}\n" for name in TORCH_ONLY)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    ctx.check("the plugin's torch-only modules import without vLLM", run.returncode == 0,
              ", ".join(TORCH_ONLY) + ("" if run.returncode == 0 else f": {run.stderr.strip().splitlines()[-1]}"))


class Oracle:
    """What each request absorbed, kept outside the plugin: its set is core + those ids (the draftable ones)."""

    def __init__(self, core: list[int]):
        self.core, self.seen = set(core), {}

    def add(self, request: str, ids) -> None:
        self.seen.setdefault(request, set()).update(int(i) for i in ids)

    def forget(self, request: str) -> None:
        self.seen.pop(request, None)

    def expected(self, request: str) -> set[int]:
        return self.core | self.seen[request]


def finite_sets(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits.float().cpu()]


def plugin_scoring_section(ctx: Context) -> None:
    sys.path.insert(0, str(REPO / "vllm_plugin"))
    from nanospec_vllm.active_vocab import ActiveVocab
    from nanospec_vllm.scoring import LogitTransform

    import_check(ctx)
    shape, device = ctx.shapes, ctx.device
    vocab_size, hidden_size, rows = shape.vocabs[0], shape.hidden, 8
    dtype = shape.dtype
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab_size, hidden_size, generator=generator) * 0.05).to(device, dtype)
    core = list(range(64))
    vocab = ActiveVocab(weight, vocab_size, slots=rows, core_ids=core, capacity=shape.plugin_capacity,
                        buffer_capacity=shape.plugin_buffer, fixed=True)
    oracle, transform = Oracle(core), LogitTransform(scale=0.5, soft_cap=30.0)
    requests = {}  # request -> slot

    def ids(count):
        return torch.randint(64, vocab_size, (count,), generator=generator).tolist()

    def admit(request, slot, count):
        prompt = ids(count)
        vocab.admit(request, prompt, slot=slot)
        oracle.add(request, prompt)
        requests[request] = slot

    for k in range(4):
        admit(f"r{k}", k, shape.plugin_capacity // 8)
    vocab.flush()
    hidden = torch.randn(rows, hidden_size, generator=generator).to(device, dtype)  # the graph's fixed inputs
    row_slots = torch.full((rows,), -1, dtype=torch.long, device=device)
    row_slots[:4] = torch.arange(4, device=device)
    with torch.inference_mode():
        step = Replayable(lambda: vocab.graph_logits(hidden, row_slots, transform), graphed=ctx.cuda)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2

    def replay_and_check(stage: str) -> None:
        vocab.flush()  # the host's writes, outside the graph (the plugin's begin_v2 does this before propose)
        with torch.inference_mode():
            got = step.replay().clone()
            eager = vocab.graph_logits(hidden, row_slots, transform)
        full = transform(hidden.float() @ weight.float().T)  # the oracle's values
        slot_request = {slot: request for request, slot in requests.items()}
        sets, bad = finite_sets(got), []
        for row, slot in enumerate(row_slots.tolist()):
            request = slot_request.get(slot)
            want = oracle.expected(request) if request is not None else set(core)
            if request in vocab.capped:  # past its capacity a V2 set stops growing: what it kept, all its own
                ok = sets[row] <= want and len(sets[row]) == shape.plugin_capacity
            else:
                ok = sets[row] == want
            ids_ = sorted(sets[row])
            ok = ok and torch.allclose(got[row, ids_].float(), full[row, ids_], atol=tolerance, rtol=tolerance)
            if not ok:
                bad.append(f"row {row} ({request}): {len(sets[row])} ids vs {len(want)} expected")
        same = torch.equal(torch.isfinite(got), torch.isfinite(eager)) and torch.allclose(
            got.float().nan_to_num(neginf=0), eager.float().nan_to_num(neginf=0), atol=tolerance)
        ctx.check(f"{stage}: replay == eager call", same)
        ctx.check(f"{stage}: replay == oracle (full head masked by each row's set)", not bad, "; ".join(bad[:3]))

    replay_and_check("captured")
    for request in ("r0", "r1"):  # the sets change: committed ids join two requests
        new = ids(16)
        vocab.absorb(request, new)
        oracle.add(request, new)
    hidden.copy_(torch.randn(rows, hidden_size, generator=generator).to(device, dtype))
    replay_and_check("sets changed")
    admit("r4", 5, 32)  # a new request in another slot: the batch grows
    row_slots[4] = 5
    replay_and_check("batch grew")
    big = ids(shape.plugin_capacity)  # more than one request may hold: the set is capped (V2 cannot fall back)
    vocab.absorb("r2", big)
    oracle.add("r2", big)
    replay_and_check("a set overflowed")
    ctx.check("the overflowing request was capped", "r2" in vocab.capped, str(sorted(vocab.capped)))
    rebuilds = vocab.stats.rebuilds
    for request in ("r0", "r1", "r2", "r3"):  # requests finish (an eighth of the buffer and more is dead rows), new
        # ones fill it past its end: a rebuild (compaction pays: active_vocab.HEADROOM)
        vocab.release(request)
        oracle.forget(request)
        del requests[request]
    free = [slot for slot in range(rows) if slot not in requests.values()]
    for k, slot in enumerate(free):  # until the buffer overflows (ids drawn at random may repeat: no fixed count)
        admit(f"r{5 + k}", slot, shape.plugin_capacity // 2)
        if vocab.stats.rebuilds > rebuilds:
            break
    replay_and_check("buffer rebuilt")
    ctx.check("the buffer was rebuilt in place", vocab.stats.rebuilds > rebuilds, f"{vocab.stats.rebuilds} rebuilds")
    vocab.read_counters()
    ctx.figure("rows scored per call (buffer capacity)", vocab.buffer_capacity)
    ctx.figure("buffer used after the sequence", vocab.used)
    with torch.inference_mode():
        ctx.figure("restricted head ms per call" + (" (graph replay)" if ctx.cuda else " (eager)"),
                   round(median_ms(step.replay, device, shape.repeats), 4))
        ctx.figure("full head ms per call (eager)", round(median_ms(lambda: transform(hidden @ weight.T), device,
                                                                    shape.repeats), 4))
    if not ctx.cuda:
        ctx.note("CUDA graph capture: CUDA only; the same calls ran eagerly")

"""The lm-head row gather on its CUDA side stream, overlapping the head backbone (nanospec_core/vocab/subset_head.py).

SubsetLMHead.gather() queues the copy of new rows on a side stream that first waits for the main stream; the next
round's head backbone runs on the main stream meanwhile, and only the lm-head product waits on the gather's event.
Two measures of whether that happens on this device:
  * the timeline: torch.profiler's trace, whose kernel events carry their stream; the gather's kernels (the ones on
    the stream that is not the backbone's) must run inside the backbone's window, overlapping its kernels
    (stream_overlap reads the trace; tests/test_gpu_check.py checks it on a made-up trace);
  * events: backbone alone, gather alone, and both as a round issues them (gather, backbone, wait), medians.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ...vocab.subset_head import SubsetLMHead
from .report import Context, Skip
from .shapes import median_ms, models


def stream_overlap(trace: dict) -> dict:
    """Kernel events of a chrome trace by stream -> {main, side, side_kernels, side_us, overlap_us, in_window}.

    main: the stream with the most kernel time (the backbone's); side: the others. overlap_us: side-kernel time that
    intersects main-stream kernels; in_window: side kernels that started before the main stream's last kernel ended
    (for a trace of one round's gather launch and backbone: the gather ran during the backbone, not after it).
    """
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "stream" in e.get("args", {})]
    busy: dict = {}
    for event in kernels:
        busy[event["args"]["stream"]] = busy.get(event["args"]["stream"], 0.0) + float(event.get("dur", 0))
    if len(busy) < 2:
        return {"streams": len(busy), "side_kernels": 0, "side_us": 0.0, "overlap_us": 0.0, "in_window": 0}
    main = max(busy, key=busy.get)
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in kernels
                   if e["args"]["stream"] == main)
    side = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in kernels if e["args"]["stream"] != main]
    overlap = sum(max(0.0, min(end, m_end) - max(start, m_start)) for start, end in side for m_start, m_end in spans)
    last_end = spans[-1][1]
    return {"streams": len(busy), "side_kernels": len(side), "side_us": round(sum(e - s for s, e in side), 2),
            "overlap_us": round(overlap, 2), "in_window": sum(1 for start, _ in side if start < last_end)}


def backbone_fn(ctx: Context):
    """One draft level of the head at the check's shape: m = top_k rows through the head backbone, then discarded."""
    shape = ctx.shapes
    target, head = models(ctx, shape.vocabs[0])
    cache = head.new_cache(64)
    rows = shape.tree[1]
    ids = torch.randint(3, shape.vocabs[0], (rows,), device=ctx.device)
    features = torch.randn(rows, head.fc.in_features, device=ctx.device, dtype=shape.dtype)

    def level():
        with torch.inference_mode():
            for _ in range(3):  # three levels, as a round's backbone runs them back to back
                hidden = head.forward(ids, features, cache)
            cache.discard()
        return hidden
    return level, target


def overlap_section(ctx: Context) -> None:
    level, target = backbone_fn(ctx)
    weight = target.lm_head_weight  # [V, H]: the rows the gather copies
    new_rows = 4096 if not ctx.quick else 256
    subset = SubsetLMHead(weight, capacity=new_rows * 8)
    generator = torch.Generator().manual_seed(0)

    def queue():
        if subset.size + new_rows > subset.capacity:
            subset.reset()
        subset.add(torch.randint(0, weight.shape[0], (new_rows,), generator=generator).to(weight.device))

    def round_like():  # what a round issues: the gather launch, the backbone, then the lm head's wait
        queue()
        subset.gather()
        hidden = level()
        subset.wait()
        return subset.logits(hidden[:1])

    round_like()
    if not ctx.cuda:
        raise Skip("the side-stream overlap is CUDA only (on the CPU the gather is synchronous); the round's "
                   "workload ran")
    repeats = ctx.shapes.repeats
    backbone_ms = median_ms(level, "cuda", repeats)
    gather_ms = median_ms(lambda: (queue(), subset.gather(), subset.wait()), "cuda", repeats)
    both_ms = median_ms(round_like, "cuda", repeats)
    ctx.figure("backbone ms (3 levels)", backbone_ms)
    ctx.figure("add + gather ms (alone; the add's one device read included)", gather_ms)
    ctx.figure("add + gather + backbone ms (as a round issues them)", both_ms)
    ctx.figure("hidden by overlap ms", backbone_ms + gather_ms - both_ms)
    # one round's launches under the profiler, without the wait: every main-stream kernel after the gather's launch is
    # the backbone's, so a gather that starts before the last of them ran during the backbone, not after it
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profiler:
        queue()
        subset.gather()
        level()
        torch.cuda.synchronize()
    subset.wait()
    path = Path(tempfile.mkdtemp()) / "trace.json"
    profiler.export_chrome_trace(str(path))
    found = stream_overlap(json.loads(path.read_text()))
    kept = ctx.out_dir / "gather_overlap_trace.json"
    if path.stat().st_size < 8 * 2**20:  # a few rounds: small enough to send back with the report
        kept.write_text(path.read_text())
    ctx.figure("timeline", [found])
    ctx.check("the gather runs on a second stream", found["streams"] >= 2 and found["side_kernels"] > 0, str(found))
    ctx.check("the gather's kernels run inside the backbone's window", found["in_window"] > 0, str(found))

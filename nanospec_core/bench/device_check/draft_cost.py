"""Where a round's time goes at the embedded shape: the draft split (head backbone / lm head / gather / tree) for
EAGLE's full-vocabulary head against NanoSpec's active rows, at vocabularies of 151,936 (the embedded target) and
262,144 (Gemma-3's); the target's verify cost per tree size; and the lm-head step eager against replayed from a CUDA
graph (the step whose shapes are fixed: m rows times the full head, or times the active buffer).

Random weights accept few drafts, so the figures that mean something are the per-round draft split and the
NanoSpec / EAGLE ratios, not tokens per round. Each decode runs twice; the second is reported (kernels warmed up).
The head backbone is not captured: its KV cache grows by host-int shapes every level (see the report's note).
"""
from __future__ import annotations

import torch

from ...config import GenerationConfig, TreeConfig, VocabConfig
from ...decoding.engine import speculative_decode
from ...decoding.request import Request
from ...vocab.policies import make_policy
from ...vocab.subset_head import SubsetLMHead, full_topk
from .report import Context
from .shapes import Replayable, median_ms, models

SPLIT = ("draft_ms", "backbone_ms", "lm_head_ms", "gather_ms", "tree_ms", "verify_ms")


def round_split(target, head, policy_name: str, shape, prompt) -> dict:
    frequency = torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(1)).to(target.device)
    cfg = VocabConfig(capacity=shape.capacity, static_core=shape.capacity // 4)
    policy = make_policy(policy_name, head.lm_head_weight, cfg, target.vocab_size,
                         head_to_target=head.head_to_target, frequency=frequency)
    depth, top_k, total = shape.tree
    request = Request(prompt, GenerationConfig(max_new_tokens=shape.new_tokens, stop_on_eos=False), frozenset())
    steps = [s for s in speculative_decode(target, head, policy, request, TreeConfig(depth, top_k, total))
             if s.round > 0]
    mean = {key: sum(getattr(s, key) for s in steps) / max(len(steps), 1) for key in SPLIT}
    mean["rounds"] = len(steps)
    mean["active"] = round(sum(s.active_vocab or 0 for s in steps) / max(len(steps), 1))
    mean["tokens"] = [t for s in steps for t in s.tokens]
    return mean


def draft_split_section(ctx: Context) -> None:
    shape, table = ctx.shapes, []
    for vocab in shape.vocabs:
        target, head = models(ctx, vocab)
        ctx.note(f"vocab {vocab}: head {ctx.cache[('where', vocab)]}")
        prompt = torch.randint(3, vocab, (shape.prompt,), generator=torch.Generator().manual_seed(0)).to(ctx.device)
        split = {}
        for name, policy in (("eagle", "full"), ("nanospec", "nanospec"), ("eagle", "full"), ("nanospec", "nanospec")):
            split[name] = round_split(target, head, policy, shape, prompt)  # the second run of each is kept
        for name, row in split.items():
            table.append({"vocab": vocab, "method": name, "rounds": row["rounds"], "active rows": row["active"],
                          **{key.replace("_ms", " ms"): round(row[key], 3) for key in SPLIT}})
        eagle, nano = split["eagle"], split["nanospec"]
        ctx.figure(f"vocab {vocab}: NanoSpec / EAGLE draft ms", round(nano["draft_ms"] / eagle["draft_ms"], 3))
        ctx.figure(f"vocab {vocab}: NanoSpec / EAGLE lm-head ms", round(nano["lm_head_ms"] / eagle["lm_head_ms"], 3))
        ctx.check(f"vocab {vocab}: NanoSpec scores fewer rows than EAGLE", nano["active"] < vocab,
                  f"{nano['active']} of {vocab}")
        if shape.dtype == torch.float32:  # bf16 trees may round differently (a batched vs a one-token forward)
            ctx.check(f"vocab {vocab}: EAGLE and NanoSpec greedy outputs agree", eagle["tokens"] == nano["tokens"],
                      f"{len(eagle['tokens'])} tokens")
    ctx.figure("draft split per round", table)


def verify_cost_section(ctx: Context) -> None:
    shape = ctx.shapes
    target, head = models(ctx, shape.vocabs[0])
    cache = target.new_cache(shape.prompt + max(shape.verify_sizes) + 8)
    prompt = torch.randint(3, shape.vocabs[0], (shape.prompt,), device=ctx.device)
    with torch.inference_mode():
        target.forward(prompt, cache, aux_layers=head.aux_layers)
        cache.commit()
    rows = []
    for size in shape.verify_sizes:
        ids = torch.randint(3, shape.vocabs[0], (size,), device=ctx.device)
        mask = torch.ones(size, size, dtype=torch.bool, device=ctx.device).tril()  # a chain: the cost of n tokens
        positions = cache.length + torch.arange(size, device=ctx.device)

        def verify():
            with torch.inference_mode():
                out = target.forward(ids, cache, positions=positions, tree_mask=mask, aux_layers=head.aux_layers)
                cache.discard()
                return target.logits(out.hidden)
        rows.append({"tree tokens": size, "verify ms": round(median_ms(verify, ctx.device, shape.repeats), 3)})
    base = rows[0]["verify ms"]
    for row in rows:
        row["x one token"] = round(row["verify ms"] / base, 2)
    ctx.figure("verify cost per tree size (target forward + logits)", rows)


def lm_head_graph_section(ctx: Context) -> None:
    """m = top_k rows through the lm head + log-softmax + top-k: EAGLE's full head vs NanoSpec's active buffer, eager
    vs a CUDA graph replay (fixed shapes: the buffer's used range does not move between replays)."""
    shape, rows = ctx.shapes, []
    k = shape.tree[1]
    for vocab in sorted(shape.vocabs, key=lambda v: ("target", v) not in ctx.cache):  # the target built last first
        target, head = models(ctx, vocab)
        weight = head.lm_head_weight
        hidden = torch.randn(k, weight.shape[1], device=ctx.device, dtype=weight.dtype)
        subset = SubsetLMHead(weight, capacity=shape.capacity)
        subset.add(torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(0))[:shape.capacity]
                   .to(ctx.device))
        subset.gather()
        subset.wait()
        steps = {"eagle (full head)": lambda: full_topk(weight, hidden, k, head.head_to_target),
                 f"nanospec ({shape.capacity} rows)": lambda: subset.topk(hidden, k)}
        for name, step in steps.items():
            with torch.inference_mode():
                eager_ms = median_ms(step, ctx.device, shape.repeats)
                row = {"vocab": vocab, "lm head step": name, "eager ms": round(eager_ms, 4)}
                if ctx.cuda:
                    graphed = Replayable(step, graphed=True)
                    replay_ms = median_ms(graphed.replay, ctx.device, shape.repeats)
                    same = torch.equal(graphed.replay()[1], step()[1])
                    row.update({"graph replay ms": round(replay_ms, 4), "speedup": round(eager_ms / replay_ms, 2)})
                    ctx.check(f"vocab {vocab}, {name}: the replay returns the eager top-k", same)
            rows.append(row)
    ctx.figure("lm-head step, eager vs CUDA graph", rows)
    if not ctx.cuda:
        ctx.note("CUDA graphs: CUDA only; the eager steps ran")
    ctx.note("the head backbone is not captured: its KV cache is written at host-int offsets that move every level "
             "(a static-cache backbone would be needed for one graph per draft level)")

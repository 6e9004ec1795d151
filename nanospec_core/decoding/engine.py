"""The speculative decode loop (EAGLE-2 dynamic tree, any vocabulary policy) as a generator of StepStats.

One request, read top to bottom:
    prefill      target forward over the prompt -> KV cache, features, the first token (the first "root")
    per round:
      absorb     the head runs over the pairs committed last round: (feature f_t, token x_{t+1})
      draft      dynamic tree from the head; its lm head scores only the policy's active rows
      verify     target forward over [root, tree nodes] with the tree mask -> accepted path + bonus token
      commit     keep the path's KV entries; the bonus token becomes the next root
      observe    the policy absorbs drafted ids and the target's top-k at every verified node
Token bookkeeping: the target cache holds every committed token except the root, which is fed first in the next
verify forward. The head's pair at position t couples the target feature f_t with token x_{t+1}: after a round that
accepted path [root, a, b] with bonus c, the new pairs are (f_root, a), (f_a, b), (f_b, c).
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..config import TreeConfig
from ..metrics import StepStats, TreeView
from ..models.eagle import DraftHead
from ..models.target import TargetModel
from ..vocab.policies import VocabPolicy
from .host import read, to_device
from .request import Request, Spans, choose, clip_tokens
from .tree import DraftTree, build_tree
from .verify import verify_greedy, verify_sampling


@torch.inference_mode()  # wraps every step of the generator: no autograd graph (the head's weights require grad)
def speculative_decode(target: TargetModel, head: DraftHead, policy: VocabPolicy, request: Request,
                       tree_cfg: TreeConfig,
                       special_ids: torch.Tensor | None = None) -> Iterator[StepStats]:
    """Yield round 0 (prefill + first token), then one StepStats per draft/verify round until EOS or the limit."""
    spans, device = Spans(target.device), target.device
    generator = request.generator(device)
    prompt = request.prompt_ids.to(device)
    # committed tokens + the largest pending tail: a verified tree (target) or the fed draft levels (head)
    max_len = prompt.numel() + request.gen.max_new_tokens + max(tree_cfg.total_tokens, tree_cfg.top_k * tree_cfg.depth) + 2
    target_cache, head_cache = target.new_cache(max_len), head.new_cache(max_len)

    # Prefill: every prompt position's features, and the target's top-k there to seed the active vocabulary.
    t0 = spans.mark()
    out = target.forward(prompt, target_cache, aux_layers=head.aux_layers)
    target_cache.commit()
    root = choose(target.logits(out.hidden[-1:])[0], request, generator)
    seed_topk = target.topk_ids(out.hidden, policy.prompt_topk) if policy.prompt_topk else None
    specials = special_ids if special_ids is not None else torch.tensor(sorted(request.stop_ids), dtype=torch.long)
    policy.begin(prompt, seed_topk, specials.to(device))
    tokens, done = clip_tokens([root], 0, request)
    produced = len(tokens)
    spans.add("prefill", t0)
    yield StepStats(round=0, tokens=tokens, accepted=len(tokens), prefill_ms=spans.resolve()["prefill"], finished=done)

    pair_ids = torch.cat([prompt[1:], to_device([root], device)])  # tokens x_{t+1} of the new pairs
    pair_features = head.target_features(out)  # f_t, [P, F]
    round_index = 0
    while not done:
        round_index += 1
        stats = StepStats(round=round_index, tokens=[], accepted=0)

        def timed(name, fn):
            def wrapper(*args):
                start = spans.mark()
                result = fn(*args)
                spans.add(name, start)
                return result
            return wrapper

        # --- draft -------------------------------------------------------------------------------------
        t_draft = spans.mark()
        policy.prepare()  # launch the gather of rows added last round (async on CUDA, overlaps the backbone)
        absorb = timed("backbone", lambda ids, feats: head.forward(ids, feats, head_cache))
        hidden = absorb(pair_ids, pair_features)  # [pairs, H]
        head_cache.commit()
        step = timed("backbone", lambda ids, feats, pos, mask: head.forward(ids, feats, head_cache, pos, mask))
        topk = timed("lm_head", lambda h, k: policy.topk(head.lm_input(h), k))
        root_logp, root_ids = topk(hidden[-1:], tree_cfg.top_k)
        tree = build_tree(root_logp[0], root_ids[0], hidden[-1], step, topk, tree_cfg,
                          base_position=head_cache.length)
        head_cache.discard()  # draft levels are never committed: next round re-absorbs the verified pairs
        spans.add("draft", t_draft)

        # --- verify ------------------------------------------------------------------------------------
        t_verify = spans.mark()
        acceptance, out, logits = verify_tree(target, target_cache, head, tree, root, request, generator)
        spans.add("verify", t_verify)

        # --- commit + observe --------------------------------------------------------------------------
        committed, done = clip_tokens(acceptance.tokens, produced, request)
        produced += len(committed)
        committed_ids = to_device(committed, device)
        hits = policy.contains(committed_ids)
        path = to_device(acceptance.path, device)
        target_cache.commit(path)  # root + accepted nodes; the bonus token is the next root
        node_topk = logits.topk(policy.node_topk, dim=-1).indices if policy.node_topk else None
        policy.observe(tree.tokens.to(device), node_topk, committed_ids, hits)
        pair_ids = to_device(acceptance.tokens, device)
        pair_features = head.target_features(out)[path]
        root = acceptance.bonus

        ms = {"backbone": 0.0, "lm_head": 0.0, **spans.resolve()}
        gather_ms = policy.last_gather_s * 1e3
        stats.tokens, stats.accepted, stats.tree_size, stats.finished = committed, len(committed), len(tree), done
        stats.active_vocab = policy.size
        tags = policy.origin_tags(committed_ids)  # the round's statistics in one read
        stats.hits, *host_tags = read(hits, *([tags] if tags is not None else []))
        stats.origins = [policy.ORIGINS[t] for t in host_tags[0]] if host_tags else None
        drawn = acceptance.tree
        stats.tree = TreeView(drawn.tokens, drawn.parents, drawn.scores, [i - 1 for i in acceptance.path[1:]],
                              acceptance.bonus)
        stats.fallback = policy.last_round_full
        stats.draft_ms, stats.verify_ms = ms["draft"], ms["verify"]
        stats.backbone_ms, stats.lm_head_ms, stats.gather_ms = ms["backbone"], ms["lm_head"], gather_ms
        stats.tree_ms = max(0.0, ms["draft"] - ms["backbone"] - ms["lm_head"] - gather_ms)
        yield stats


def verify_tree(target: TargetModel, cache, head: DraftHead, tree: DraftTree, root: int, request: Request, generator):
    """Target forward over [root, nodes] with the tree mask, then greedy or lossless-sampling acceptance.

    Node i sits at position cache.length + depth(i): siblings share a position, as they would in their own
    sequence. Returns (Acceptance, TargetOutput, logits [n + 1, V] float32).
    """
    device = target.device
    ids = torch.cat([to_device([root], device), tree.tokens.to(device)])  # [n + 1]
    positions = cache.length + tree.position_offsets().to(device)
    out = target.forward(ids, cache, positions=positions, tree_mask=tree.verify_mask().to(device),
                         aux_layers=head.aux_layers)
    logits = target.logits(out.hidden)  # [n + 1, V]
    if request.gen.temperature <= 0:
        return verify_greedy(tree, logits), out, logits
    return verify_sampling(tree, logits, request.gen.temperature, generator), out, logits

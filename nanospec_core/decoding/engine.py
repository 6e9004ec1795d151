"""The speculative decode loop (EAGLE-2 dynamic tree, any vocabulary policy, optional copy branches) as a
generator of StepStats.

One request, read top to bottom:
    prefill      target forward over the prompt -> KV cache, features, the first token (the first "root")
    per round:
      draft      the head absorbs last round's pairs and grows a dynamic tree over the policy's active rows
                 (head_draft.py); copy branches, continuations of the latest tokens found earlier in the context,
                 join it (copy_draft.py, tree.add_branches)
      verify     target forward over [root, tree nodes] with the tree mask -> accepted path + bonus token
      commit     keep the path's KV entries; the bonus token becomes the next root
      observe    the policy absorbs drafted ids and the target's top-k at every verified node; the copy index
                 absorbs the committed tokens and the copy branches' acceptance
Token bookkeeping: the target cache holds every committed token except the root, which is fed first in the next
verify forward. Copy branches change what is proposed, never what is emitted: verification is the same rule over
the merged tree (greedy: the target's argmax path; sampling: recursive rejection, exact for any set of siblings).
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..config import CopyConfig, TreeConfig
from ..metrics import StepStats, TreeView
from ..models.eagle import DraftHead
from ..models.target import TargetModel
from ..vocab.policies import VocabPolicy
from .copy_draft import CopyDrafter, NoCopy
from .head_draft import HeadDrafter, NoHead
from .host import read, to_device
from .request import Request, Spans, choose, clip_tokens
from .tree import DraftTree, add_branches, held_prefix
from .verify import Acceptance, verify_greedy, verify_sampling


@torch.inference_mode()  # wraps every step of the generator: no autograd graph (the head's weights require grad)
def speculative_decode(target: TargetModel, head: DraftHead | None, policy: VocabPolicy | None, request: Request,
                       tree_cfg: TreeConfig, special_ids: torch.Tensor | None = None,
                       copy: CopyConfig | None = None) -> Iterator[StepStats]:
    """Yield round 0 (prefill + first token), then one StepStats per draft/verify round until EOS or the limit.

    head None: no head tree (the lookup method); copy None: no copy branches."""
    spans, device = Spans(target.device), target.device
    generator = request.generator(device)
    prompt = request.prompt_ids.to(device)
    drafter = HeadDrafter(head, policy, tree_cfg, spans) if head is not None else NoHead(device)
    copier = CopyDrafter(copy) if copy is not None else NoCopy()
    # committed tokens + the largest pending tail: a verified tree (head nodes + copy nodes) or the fed draft levels
    max_len = prompt.numel() + request.gen.max_new_tokens + drafter.pending + copier.max_nodes + 2
    target_cache = target.new_cache(max_len)

    # Prefill: every prompt position's features, and the target's top-k there to seed the active vocabulary.
    t0 = spans.mark()
    out = target.forward(prompt, target_cache, aux_layers=drafter.aux_layers)
    target_cache.commit()
    root = choose(target.logits(out.hidden[-1:])[0], request, generator)
    specials = special_ids if special_ids is not None else torch.tensor(sorted(request.stop_ids), dtype=torch.long)
    drafter.begin(target, prompt, out, root, specials.to(device), max_len)
    copier.begin(read(request.prompt_ids)[0] + [root])  # the context so far (host ids): prompt + first token
    tokens, done = clip_tokens([root], 0, request)
    produced = len(tokens)
    spans.add("prefill", t0)
    yield StepStats(round=0, tokens=tokens, accepted=len(tokens), prefill_ms=spans.resolve()["prefill"], finished=done)

    round_index = 0
    while not done:
        round_index += 1
        stats = StepStats(round=round_index, tokens=[], accepted=0)

        # --- draft: the head's tree, then the copy branches merged into it -----------------------------
        t_draft = spans.mark()
        free = copier.head_free()  # the copies alone expected faster this round: no head tree (copy_draft.py)
        head_tree = drafter.skip() if free else drafter.draft()
        branches = copier.branches(held_prefix(head_tree))  # the head's nodes a copy repeats cost nothing
        tree, chains = add_branches(head_tree, [(b.tokens, b.scores) for b in branches], copier.max_nodes)
        spans.add("draft", t_draft)

        # --- verify ------------------------------------------------------------------------------------
        t_verify = spans.mark()
        acceptance, out, logits = verify_tree(target, target_cache, drafter.aux_layers, tree, root, request,
                                              generator)
        spans.add("verify", t_verify)

        # --- commit + observe --------------------------------------------------------------------------
        committed, done = clip_tokens(acceptance.tokens, produced, request)
        produced += len(committed)
        committed_ids = to_device(committed, device)
        target_cache.commit(to_device(acceptance.path, device))  # root + accepted nodes; the bonus is the next root
        drafter.observe(tree, out, logits, acceptance, committed_ids, stats)
        copier.observe(branches, [len(nodes) for nodes in chains], acceptance.tokens[:acceptance.accept_len])
        copier.extend(committed)
        root = acceptance.bonus

        stats.tokens, stats.accepted, stats.tree_size, stats.finished = committed, len(committed), len(tree), done
        stats.tree = tree_view(acceptance, len(head_tree), branches, chains)
        stats.copy_nodes, stats.head_free = len(tree) - len(head_tree), free
        # per committed token: did a node a copy branch added hold it (verify index v is node v - 1)? bonus: no
        stats.copied = ([v - 1 >= len(head_tree) for v in acceptance.path[1:]] + [False])[:len(committed)]
        stats.copy_accepted = sum(stats.copied)
        ms = {"backbone": 0.0, "lm_head": 0.0, **spans.resolve()}
        stats.draft_ms, stats.verify_ms = ms["draft"], ms["verify"]
        stats.backbone_ms, stats.lm_head_ms = ms["backbone"], ms["lm_head"]
        stats.tree_ms = max(0.0, ms["draft"] - ms["backbone"] - ms["lm_head"] - stats.gather_ms)
        yield stats


def tree_view(acceptance: Acceptance, head_nodes: int, branches, chains: list[list[int]]) -> TreeView:
    """The round's tree as verification read it, with each node's origin ('head', 'copy' = added by a copy
    branch, 'both' = a head node a copy branch proposed too) and a copied node's source position in the context."""
    drawn = acceptance.tree
    origins = ["head"] * head_nodes + ["copy"] * (len(drawn.tokens) - head_nodes)
    sources: list[int | None] = [None] * len(drawn.tokens)
    for branch, nodes in zip(branches, chains):
        for offset, node in enumerate(nodes):
            origins[node] = "both" if node < head_nodes else "copy"
            sources[node] = branch.start + offset if sources[node] is None else sources[node]
    return TreeView(drawn.tokens, drawn.parents, drawn.scores, [i - 1 for i in acceptance.path[1:]],
                    acceptance.bonus, origins=origins, sources=sources)


def verify_tree(target: TargetModel, cache, aux_layers: tuple[int, ...], tree: DraftTree, root: int,
                request: Request, generator):
    """Target forward over [root, nodes] with the tree mask, then greedy or lossless-sampling acceptance.

    Node i sits at position cache.length + depth(i): siblings share a position, as they would in their own
    sequence. Returns (Acceptance, TargetOutput, logits [n + 1, V] float32).
    """
    device = target.device
    ids = torch.cat([to_device([root], device), tree.tokens.to(device)])  # [n + 1]
    positions = cache.length + tree.position_offsets().to(device)
    mask = tree.verify_mask().to(device) if len(tree) else None  # the root alone: a plain decoding step
    out = target.forward(ids, cache, positions=positions, tree_mask=mask, aux_layers=aux_layers)
    logits = target.logits(out.hidden)  # [n + 1, V]
    if request.gen.temperature <= 0:
        return verify_greedy(tree, logits), out, logits
    return verify_sampling(tree, logits, request.gen.temperature, generator), out, logits

"""The EAGLE head with its vocabulary policy, as the round loop's drafter: absorb -> dynamic tree -> observe.

Token bookkeeping: the head's pair at position t couples the target feature f_t with token x_{t+1}: after a round
that accepted path [root, a, b] with bonus c, the new pairs are (f_root, a), (f_a, b), (f_b, c). The head's draft
levels are never committed: each round re-absorbs the verified pairs. A round that drafts no head tree (skip: the
copies alone were expected faster, copy_draft.head_free) absorbs nothing: its pairs wait, appended, for the next draft.
`NoHead` drafts nothing (the lookup method: copy branches alone).
"""
from __future__ import annotations

import torch

from ..config import TreeConfig
from ..metrics import StepStats
from ..models.eagle import DraftHead
from ..vocab.policies import VocabPolicy
from .host import read, to_device
from .request import Spans
from .tree import DraftTree, build_tree
from .verify import Acceptance


class HeadDrafter:
    def __init__(self, head: DraftHead, policy: VocabPolicy, tree_cfg: TreeConfig, spans: Spans):
        self.head, self.policy, self.tree_cfg, self.spans = head, policy, tree_cfg, spans
        self.aux_layers = head.aux_layers  # the target layers whose features the head reads
        self.pending = max(tree_cfg.total_tokens, tree_cfg.top_k * tree_cfg.depth)  # the largest uncommitted tail

    def begin(self, target, prompt: torch.Tensor, out, root: int, specials: torch.Tensor, max_len: int) -> None:
        """After the prefill: seed the active vocabulary (prompt ids, the target's top-k there, specials) and queue
        every prompt pair for the first absorb."""
        self.cache = self.head.new_cache(max_len)
        seed_topk = target.topk_ids(out.hidden, self.policy.prompt_topk) if self.policy.prompt_topk else None
        self.policy.begin(prompt, seed_topk, specials)
        self.pair_ids = torch.cat([prompt[1:], to_device([root], prompt.device)])  # tokens x_{t+1} of the pairs
        self.pair_features = self.head.target_features(out)  # f_t, [P, F]
        self.absorbed = False  # whether the pending pairs went into the head's cache (draft) since they were queued

    def _timed(self, name, fn):
        def wrapper(*args):
            start = self.spans.mark()
            result = fn(*args)
            self.spans.add(name, start)
            return result
        return wrapper

    def draft(self) -> DraftTree:
        head, policy, cache, cfg = self.head, self.policy, self.cache, self.tree_cfg
        policy.prepare()  # launch the gather of rows added last round (async on CUDA, overlaps the backbone)
        absorb = self._timed("backbone", lambda ids, feats: head.forward(ids, feats, cache))
        hidden = absorb(self.pair_ids, self.pair_features)  # [pairs, H]
        cache.commit()
        self.absorbed = True
        step = self._timed("backbone", lambda ids, feats, pos, mask: head.forward(ids, feats, cache, pos, mask))
        topk = self._timed("lm_head", lambda h, k: policy.topk(head.lm_input(h), k))
        root_logp, root_ids = topk(hidden[-1:], cfg.top_k)
        tree = build_tree(root_logp[0], root_ids[0], hidden[-1], step, topk, cfg, base_position=cache.length)
        cache.discard()  # draft levels are never committed: next round re-absorbs the verified pairs
        return tree

    def skip(self) -> DraftTree:
        """A round without the head's tree: nothing drafted, nothing absorbed (the pairs keep waiting)."""
        return DraftTree.empty(self.pair_ids.device)

    def observe(self, tree: DraftTree, out, logits: torch.Tensor, acceptance: Acceptance,
                committed_ids: torch.Tensor, stats: StepStats) -> None:
        """The policy absorbs the round's ids (drafted, the target's top-k at every verified node, committed); the
        accepted path's pairs are queued; the policy's part of the round's statistics, in one read."""
        policy, device = self.policy, committed_ids.device
        hits = policy.contains(committed_ids)
        node_topk = logits.topk(policy.node_topk, dim=-1).indices if policy.node_topk else None
        policy.observe(tree.tokens.to(device), node_topk, committed_ids, hits)
        path = to_device(acceptance.path, device)
        ids, features = to_device(acceptance.tokens, device), self.head.target_features(out)[path]
        if not self.absorbed:  # a head-free round: these pairs follow the ones still waiting
            ids, features = torch.cat([self.pair_ids, ids]), torch.cat([self.pair_features, features])
        self.pair_ids, self.pair_features, self.absorbed = ids, features, False
        stats.active_vocab = policy.size
        tags = policy.origin_tags(committed_ids)  # the round's statistics in one read
        stats.hits, *host_tags = read(hits, *([tags] if tags is not None else []))
        stats.origins = [policy.ORIGINS[t] for t in host_tags[0]] if host_tags else None
        stats.fallback = policy.last_round_full
        stats.gather_ms = policy.last_gather_s * 1e3


class NoHead:
    """The drafter of a method without a head: an empty tree every round (copy branches may join it)."""

    aux_layers, pending = (), 0

    def __init__(self, device):
        self.device = device

    def begin(self, *args) -> None:
        pass

    def draft(self) -> DraftTree:
        return DraftTree.empty(self.device)

    skip = draft

    def observe(self, *args) -> None:
        pass

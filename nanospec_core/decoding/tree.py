"""EAGLE-2 dynamic draft tree: expansion, layout, attention mask.

Reference: Li et al., "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees" (2024), sec. 4.
The draft head's cumulative log-probability of a node approximates the chance that the target accepts the
whole path to it, so EAGLE-2 grows the tree where that value is highest:

    score(node) = sum of draft log-probs along root -> node         (<= score(parent), log-probs are <= 0)
    expand:  at every level keep the top_k best new nodes (the "frontier", best k of m*k children)
    rerank:  over all candidates of all levels keep the total_tokens best; ancestor-closed, because a parent
             scores at least as high as its children and ranks first on ties (it is shallower)

Index spaces. Tree nodes are 0..n-1 (`parents` uses them, -1 = child of the root). The target verifies
[root, node_0, ..., node_{n-1}], so in "verify space" node i is index i+1 and the root is index 0. The root is
the last committed token, not yet in the target's KV cache.

Worked example (top_k=2, depth=2, total_tokens=3): root top-2 = {a: -0.1, b: -1.2}; the head expands a and b;
children a->c: -0.1-0.3, a->d: -0.1-2.0, b->e: -1.2-0.2, ... Best 3 over {a, b, c, d, e, ...} = a (-0.1),
c (-0.4), b (-1.2): tokens [a, b, c], parents [-1, -1, 0], depths [1, 1, 2]; verify input [root, a, b, c].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nanospec_core.config import TreeConfig
from nanospec_core.decoding.host import read, to_device

# step(token_ids [m], parent_hidden [m, H], position_ids [m], attn_mask [m, F+m] bool) -> hidden [m, H]
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# topk(hidden [m, H], k) -> (log-probs [m, k], token ids [m, k]); -inf log-probs mark missing entries
TopkFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [n] long: token ids of the draft nodes, parents first (by depth, then score desc)
    parents: torch.Tensor  # [n] long: parent node index, -1 for children of the root
    depths: torch.Tensor  # [n] long: 1-based depth (children of the root are depth 1)
    scores: torch.Tensor  # [n] float32: cumulative draft log-prob of the path root -> node
    depth_bound: int | None = None  # host-side upper bound on the depth (levels built); None: read it
    host: tuple[list[int], list[int]] | None = None  # (tokens, parents) as host lists, read with the rerank

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def empty(cls, device) -> "DraftTree":
        """No draft nodes (a round without a head): verification then checks the root alone, or added branches."""
        none = torch.zeros(0, dtype=torch.long, device=device)
        return cls(none, none, none, torch.zeros(0, device=device), depth_bound=0, host=([], []))

    @property
    def max_depth(self) -> int:
        """The deepest node's depth (a device read; the round itself uses depth_bound)."""
        return read(self.depths.max())[0][0] if len(self) else 0

    def verify_parents(self) -> torch.Tensor:
        """[n+1] verify-space parent of every verify index; the root is its own parent (a fixed point)."""
        return torch.cat([self.parents.new_zeros(1), self.parents + 1])

    def verify_mask(self) -> torch.Tensor:
        """[n+1, n+1] bool: mask[i, j] = True iff j is i or an ancestor of i (the root is everyone's ancestor).

        Built by pointer jumping: walk every row up its parent chain at once, max_depth + 1 batched steps.
        """
        size = len(self) + 1
        parent_v = self.verify_parents()
        mask = torch.zeros(size, size, dtype=torch.bool, device=self.tokens.device)
        rows = torch.arange(size, device=self.tokens.device)
        ancestor = rows.clone()
        bound = self.depth_bound if self.depth_bound is not None else self.max_depth
        for _ in range(bound + 1):  # extra steps are harmless: finished rows keep rewriting the root column
            mask[rows, ancestor] = True
            ancestor = parent_v[ancestor]  # the root maps to itself, so finished rows rewrite column 0
        return mask

    def position_offsets(self) -> torch.Tensor:
        """[n+1] long: depth of every verify index (root 0); the target position is cache_len + offset."""
        return torch.cat([self.depths.new_zeros(1), self.depths])

    def host_layout(self, *extra: torch.Tensor) -> "HostTree":
        """The tree on the host in one device read (tokens, parents, scores, children); `extra` tensors ride
        along in the same read (HostTree.extra)."""
        order = torch.argsort(self.scores, descending=True, stable=True)
        tokens, parents, scores, order, *rest = read(self.tokens, self.parents, self.scores, order, *extra)
        return HostTree(tokens, parents, scores, children_of(parents, order), rest)

    def children(self) -> list[list[int]]:
        """Verify-space children of every verify index (0 = root), siblings by descending draft score."""
        return self.host_layout().children

    def path_to(self, verify_index: int) -> list[int]:
        """Verify-space indices root .. verify_index."""
        return path_to(read(self.parents)[0], verify_index)


@dataclass
class HostTree:
    """A DraftTree read to the host: children[v] are verify index v's children (0 = root), by descending score."""

    tokens: list[int]
    parents: list[int]
    scores: list[float]
    children: list[list[int]]
    extra: list[list]


def children_of(parents: list[int], order: list[int]) -> list[list[int]]:
    """Host lists -> verify-space children per verify index, in `order` (node indices by descending score)."""
    kids: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for node in order:
        kids[parents[node] + 1].append(node + 1)
    return kids


def path_to(parents: list[int], verify_index: int) -> list[int]:
    """Verify-space indices root .. verify_index, from the host list of node parents."""
    path = [verify_index]
    while path[-1] != 0:
        path.append(parents[path[-1] - 1] + 1)
    return path[::-1]


@dataclass
class _Candidates:
    """Every node the expansion scored, level by level (flat, in expansion order); -inf entries are kept
    in place (cheaper than filtering every level) and can never be chosen: _best skips them."""

    tokens: list[torch.Tensor]  # per level [c_d] long
    parents: list[torch.Tensor]  # per level [c_d] long: global candidate index of the parent, -1 at level 1
    scores: list[torch.Tensor]  # per level [c_d] float32: cumulative log-prob, -inf = no such node

    def add(self, tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor) -> int:
        """Append a level; returns the global candidate index of its first entry."""
        start = sum(t.shape[0] for t in self.tokens)
        self.tokens.append(tokens)
        self.parents.append(parents)
        self.scores.append(scores)
        return start


def _best(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, best first; ties keep the earlier index (stable). No device read:
    -inf entries (a sub-vocabulary smaller than k) may be among them; their children stay -inf and _rerank
    drops them all at once."""
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def build_tree(root_logp: torch.Tensor, root_ids: torch.Tensor, root_hidden: torch.Tensor, step: StepFn,
               topk: TopkFn, cfg: TreeConfig, base_position: int) -> DraftTree:
    """Grow an EAGLE-2 dynamic tree and keep its best cfg.total_tokens nodes.

    root_logp, root_ids: [k] the draft's level-1 log-probs and ids (from the head's last committed output);
    root_hidden: [H] the head hidden state that produced them (the parent hidden of level-1 nodes).
    A level-d node is fed at position base_position + d - 1. Level d = 2..depth runs the head once on the
    previous level's frontier (so depth levels cost depth - 1 step calls); the head's draft KV region grows
    by m entries per call and attn_mask [m, F+m] shows each fed node its fed ancestors and itself.
    """
    device = root_ids.device
    k = cfg.top_k
    # log q <= 0; the clamp only removes rounding, so a child never outscores its parent (see _rerank)
    level_scores = root_logp.float().clamp(max=0.0)  # [k0]
    cands = _Candidates([], [], [])
    level_start = cands.add(root_ids.long(), torch.full_like(root_ids, -1, dtype=torch.long), level_scores)

    frontier = _best(level_scores, k)  # [m] rows of the newest level, best first
    parent_hidden = root_hidden.reshape(1, -1).expand(len(frontier), -1)  # [m, H]
    parent_fed = None  # [m] fed index of each frontier node's parent; None at level 1 (the root isn't fed)
    # fed_mask[i, j]: fed draft entry i may attend fed entry j (j is i or its ancestor); grows by m rows a call
    max_fed = k * max(cfg.depth - 1, 0)
    fed_mask = torch.zeros(max_fed, max_fed, dtype=torch.bool, device=device)
    fed = 0  # F: draft entries fed so far
    for depth in range(2, cfg.depth + 1):
        m = frontier.shape[0]
        if m == 0:
            break
        new = torch.arange(fed, fed + m, device=device)  # [m] fed indices of this call's nodes
        if parent_fed is not None:
            fed_mask[new] = fed_mask[parent_fed]  # see what the parent sees ...
        fed_mask[new, new] = True  # ... plus itself
        attn_mask = fed_mask[fed:fed + m, :fed + m]  # [m, F+m]
        positions = torch.full((m,), base_position + depth - 2, dtype=torch.long, device=device)  # level d-1
        hidden = step(cands.tokens[-1][frontier], parent_hidden, positions, attn_mask)  # [m, H]

        logp, ids = topk(hidden, k)  # [m, k] each
        # score(child) = score(parent) + log q(child | path), over all m*k children (flattened row-major)
        child_scores = level_scores[frontier][:, None] + logp.float().clamp(max=0.0)  # [m, k]
        child_parents = (level_start + frontier).repeat_interleave(k)  # [m*k]
        level_scores = child_scores.flatten()  # [m*k]
        level_start = cands.add(ids.flatten().long(), child_parents, level_scores)

        frontier = _best(level_scores, k)  # next frontier: best k of the m*k children
        source = frontier // k  # [m'] row of each new frontier node's parent in this call
        parent_hidden = hidden[source]  # [m', H]
        parent_fed = fed + source  # [m']
        fed += m

    return _rerank(cands, cfg.total_tokens)


def _rerank(cands: _Candidates, total_tokens: int) -> DraftTree:
    """Keep the best total_tokens candidates of all levels and lay them out parents first.

    Candidates are concatenated level by level, so a stable sort by score desc ranks by (score desc, depth asc):
    a parent (score >= child's, shallower) always ranks before its children, hence any prefix is
    ancestor-closed. The layout then sorts the kept nodes by depth (stable: score desc within a level).
    """
    tokens = torch.cat(cands.tokens)  # [C]
    parents = torch.cat(cands.parents)  # [C] global candidate index, -1 at level 1
    scores = torch.cat(cands.scores)  # [C]
    sizes = [len(t) for t in cands.tokens]  # host ints: no device read to lay out depths
    depths = torch.cat([torch.full((size,), depth, dtype=torch.long, device=tokens.device)
                        for depth, size in enumerate(sizes, start=1)])

    kept = _best(scores, total_tokens)  # [n] candidate indices, rank order (-inf ones last)
    finite = torch.isfinite(scores[kept])
    # parents-first layout (stable: score desc within a level), with -inf candidates after every real node
    layout_key = torch.where(finite, depths[kept], len(sizes) + 1)
    kept = kept[torch.sort(layout_key, stable=True).indices]
    finite = torch.isfinite(scores[kept])

    # candidate index -> node index (shifted by one so that parent -1 maps to -1)
    node_of = torch.full((len(tokens) + 1,), -1, dtype=torch.long, device=tokens.device)
    node_of[kept + 1] = torch.arange(len(kept), device=tokens.device)
    node_parents = node_of[parents[kept] + 1]  # [n]
    orphan = (node_parents < 0) & (parents[kept] >= 0) & finite
    # the tree's one device read; its tokens and parents ride along for add_branches
    (count,), (broken,), host_tokens, host_parents = read(finite.sum(), orphan.any(), tokens[kept], node_parents)
    if broken:
        raise RuntimeError("draft tree is not ancestor-closed (NaN draft scores?)")
    return DraftTree(tokens=tokens[kept][:count], parents=node_parents[:count], depths=depths[kept][:count],
                     scores=scores[kept][:count], depth_bound=len(sizes),
                     host=(host_tokens[:count], host_parents[:count]))


def _children(tree: DraftTree) -> tuple[list[int], list[int], dict[tuple[int, int], int]]:
    """The tree's tokens and parents on the host, and (parent, token) -> node: the first of duplicate siblings,
    the one a root-down walk follows."""
    tokens, parents = tree.host if tree.host is not None else read(tree.tokens, tree.parents)
    child: dict[tuple[int, int], int] = {}
    for node, (token, parent) in enumerate(zip(tokens, parents)):
        child.setdefault((parent, token), node)
    return tokens, parents, child


def held_prefix(tree: DraftTree) -> Callable[[list[int]], tuple[int, bool]]:
    """For a root-down chain of tokens: how many of its leading tokens the tree already holds, and whether the tree
    drafted other tokens at the next place (the node reached has children, none of them the chain's next token) or
    simply stops there (a leaf: it drafted nothing deeper). add_branches walks chains the same way.

    Tree tokens [a, b, c], parents [-1, -1, 0]: [a, d] -> (1, True) (a's child is c, not d); [b, d] -> (1, False)
    (b is a leaf); [d] -> (0, True) (the root's children are a and b); [a, c, e] -> (2, False) (c is a leaf).
    """
    child: dict[tuple[int, int], int] = {}
    inner: set[int] = set()  # nodes with children (-1: the root, when anything was drafted)

    def walk(chain: list[int]) -> tuple[int, bool]:
        if not inner:  # built on the first walk: a round without copy branches never reads the tree
            _, parents, found = _children(tree)
            child.update(found)
            inner.update(parents, [None])  # None: built, even for an empty tree
        node = -1
        for held, token in enumerate(chain):
            found = child.get((node, token))
            if found is None:
                return held, node in inner
            node = found
        return len(chain), False

    return walk


def add_branches(tree: DraftTree, branches: list[tuple[list[int], list[float]]],
                 max_new: int) -> tuple[DraftTree, list[list[int]]]:
    """Merge root-down token chains (copy drafts, with their node scores) into the tree as extra branches.

    A chain walks down from the root through the nodes that already hold its tokens (a prefix the head drafted
    too costs nothing and adds no duplicate sibling), then hangs its remaining tokens below as new nodes, at most
    max_new in all. New nodes follow the old ones, so every parent still precedes its children: the verify mask
    (pointer jumping over parents), the positions (depths) and the kept path's increasing indices stay right.
    Returns the merged tree and each chain's node indices, as far as the chain entered the tree.

    Worked example: tree tokens [a, b, c], parents [-1, -1, 0]; chain [a, c, d] walks a (node 0), c (node 2),
    then adds d as node 3 under node 2: chain nodes [0, 2, 3], new parents [2], depths [3].
    """
    tokens, parents, child = _children(tree)
    added: dict[str, list] = {"tokens": [], "parents": [], "depths": [], "scores": []}
    chains = []
    for chain_tokens, chain_scores in branches:
        node, nodes = -1, []
        for depth, (token, score) in enumerate(zip(chain_tokens, chain_scores), start=1):
            found = child.get((node, token))
            if found is None:
                if len(added["tokens"]) >= max_new:
                    break
                found = child[(node, token)] = len(tokens) + len(added["tokens"])
                for name, value in zip(added, (token, node, depth, score)):
                    added[name].append(value)
            nodes.append(found)
            node = found
        chains.append(nodes)
    if not added["tokens"]:
        return tree, chains
    device = tree.tokens.device
    bound = tree.depth_bound if tree.depth_bound is not None else tree.max_depth
    merged = DraftTree(tokens=torch.cat([tree.tokens, to_device(added["tokens"], device)]),
                       parents=torch.cat([tree.parents, to_device(added["parents"], device)]),
                       depths=torch.cat([tree.depths, to_device(added["depths"], device)]),
                       scores=torch.cat([tree.scores, to_device(added["scores"], device, torch.float32)]),
                       depth_bound=max(bound, max(added["depths"])),
                       host=(tokens + added["tokens"], parents + added["parents"]))
    return merged, chains

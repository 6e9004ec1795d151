"""Lossless acceptance of a draft tree against the target's logits at every verify index.

target_logits[i] is the target's next-token logits after the context + the verify-space path root .. i
(row 0 = after the root, the last committed token). Both rules walk down from the root and emit the accepted
draft tokens, then one bonus token drawn from the target at the node where the walk stopped, so every round
commits at least one token (the bonus) and at most max_depth + 1.

- Greedy (temperature 0): follow the child whose token is the target's argmax. The emitted tokens are exactly
  plain greedy decoding, whatever the draft proposed.
- Sampling (temperature > 0): recursive rejection sampling with point-mass proposals (SpecInfer, EAGLE-2's
  evaluate_posterior). Exact for any draft, including one restricted to a sub-vocabulary; see verify_sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanospec_core.decoding.host import read
from nanospec_core.decoding.tree import DraftTree, HostTree, path_to


@dataclass
class Acceptance:
    path: list[int]  # verify-space indices of the accepted path, starting with 0 (the root)
    tokens: list[int]  # the accepted draft tokens (path without the root), then the bonus token last
    bonus: int  # the target's token after the last accepted node
    tree: HostTree | None = field(default=None, compare=False, repr=False)  # as read for this decision

    @property
    def accept_len(self) -> int:
        """Draft tokens accepted this round (tau counts the bonus too: accept_len + 1 = len(tokens))."""
        return len(self.path) - 1


def _acceptance(tree: HostTree, path: list[int], bonus: int) -> Acceptance:
    return Acceptance(path=path, tokens=[tree.tokens[i - 1] for i in path[1:]] + [bonus], bonus=bonus, tree=tree)


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor) -> Acceptance:
    """Accept the longest tree path that matches the target's argmax; bonus = argmax at its last node.

    target_logits: [n+1, V]. Walks down level by level keeping every matching node, so that a repeated sibling
    token (possible with a caller's own topk) still finds the deepest match; ties: the first found.
    """
    # the round's one read: the target's greedy token after each verify index [n+1], with the tree's layout
    host = tree.host_layout(target_logits.argmax(dim=-1))
    (best,), tokens, children = host.extra, host.tokens, host.children
    deepest, matching = 0, [0]
    while matching:  # matching: the verify indices at this depth whose whole path equals greedy decoding
        matching = [c for node in matching for c in children[node] if tokens[c - 1] == best[node]]
        deepest = matching[0] if matching else deepest
    return _acceptance(host, path_to(host.parents, deepest), best[deepest])


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """One token from softmax(logits / T) (argmax when T <= 0). logits: [V]."""
    if temperature <= 0:
        return read(logits.argmax())[0][0]
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
    return read(torch.multinomial(probs, 1, generator=generator))[0][0]


def verify_sampling(tree: DraftTree, target_logits: torch.Tensor, temperature: float,
                    generator: torch.Generator | None) -> Acceptance:
    """Recursive rejection sampling over the tree; the emitted tokens follow the target distribution exactly.

    At node u with target p = softmax(target_logits[u] / T), try the children c_1, c_2, ... (draft score order):
        accept c_j with probability p_j(x_j),  p_1 = p,  p_{j+1} = p_j with x_j zeroed, renormalised;
        if nothing is accepted (or u is a leaf), the bonus token is drawn from the residual p_{m+1}.
    Why P(emit x) = p(x) (the draft is a point mass on x_j, so min(1, p/q) becomes p_j(x_j)):
        P(reach try j) = prod_{i<j} (1 - p_i(x_i)) = 1 - sum_{i<j} p(x_i)   (the mass already zeroed), hence
        P(emit x_j) = P(reach j) * p(x_j) / (1 - sum_{i<j} p(x_i)) = p(x_j)   for a first occurrence of x_j;
        P(emit y not tried) = (1 - sum_i p(x_i)) * p(y) / (1 - sum_i p(x_i)) = p(y).
    A repeated sibling token has mass 0 once rejected, so it is never accepted (and is not double counted).
    The rule never reads a draft probability, so where a sibling came from does not matter: a head's node and a
    copy branch's (a deterministic copy of the context, a point mass too) are tried alike, in score order.
    If x is accepted, the walk continues at that child whose row is the target conditioned on ... + x, so by
    induction over depth every emitted prefix has the target's probability; the next round resumes from the
    bonus with the target's own conditional. T <= 0 falls back to verify_greedy.
    """
    if temperature <= 0:
        return verify_greedy(tree, target_logits)
    # each node is tried at most once per round, so n uniforms suffice; one draw keeps the overhead small
    device = generator.device if generator is not None else target_logits.device  # generator and logits share it
    host = tree.host_layout(torch.rand(len(tree), generator=generator, device=device))
    tokens, children, draws = host.tokens, host.children, iter(host.extra[0])
    path = [0]
    while True:
        node = path[-1]
        probs = torch.softmax(target_logits[node].float() / temperature, dim=-1)  # [V] p, then the residual
        child = _try_children(probs, [tokens[c - 1] for c in children[node]], draws)
        if child is None:
            return _acceptance(host, path, _sample_residual(probs, generator))
        path.append(children[node][child])


def _try_children(probs: torch.Tensor, child_tokens: list[int], draws) -> int | None:
    """Rejection loop at one node: index of the accepted child, or None. Zeroes rejected tokens in probs.

    The residual is kept unnormalised: accept x_j iff r * mass < p(x_j), with mass = remaining sum,
    i.e. r < p_j(x_j); this never divides by a mass that rounding drove to zero.
    """
    if not child_tokens:
        return None
    child_probs, (mass,) = read(probs[child_tokens], probs.sum())  # p(x_j) before any rejection; sum p
    rejected: set[int] = set()
    for j, (token, p_token) in enumerate(zip(child_tokens, child_probs)):
        if token in rejected:  # a duplicate: its residual mass is 0
            continue
        if p_token > 0 and next(draws) * mass < p_token:
            return j
        rejected.add(token)
        last_rejected = token
        mass -= p_token
    if rejected:
        probs[list(rejected)] = 0.0
        if not read(probs.sum())[0][0] > 0:  # rounding rejected the token that held all remaining mass: emit it
            probs[last_rejected] = 1.0
    return None


def _sample_residual(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Bonus token ~ the (unnormalised) residual; multinomial normalises."""
    return read(torch.multinomial(probs, 1, generator=generator))[0][0]

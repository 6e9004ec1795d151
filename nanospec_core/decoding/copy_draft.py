"""Copy drafting: continuations of the latest committed tokens found earlier in the context (prompt + output).

Temporal locality at the level of phrases: summaries, answers from a passage, extractions, code edits copy spans of
their context. When the last n committed tokens occurred before, what followed them then is a likely continuation
now (prompt lookup decoding, Saxena 2023; SAM-Decoding, Hu et al. 2024, merges such matches into EAGLE-2's tree).

Index (incremental, never a rescan): for every n in min_ngram..max_ngram, n-gram -> its end positions (ascending).
Committing the token at position i adds ctx[i-n+1 .. i] -> i for each n: O(max_ngram) per token.
Query, with T the last position: for n = max_ngram down to min_ngram, the suffix s = ctx[T-n+1 .. T]; every earlier
end p < T of s, most recent first (at most SCAN_PER_NGRAM of them), proposes ctx[p+1 .. p+length], whose source span
is [p+1, p+1+len). A proposal equal to, or a prefix of, one already taken adds nothing to the tree: skipped.

    >>> drafter = CopyDrafter(CopyConfig(max_ngram=2, branches=2, length=3)); drafter.begin([5, 6, 7, 8, 5, 6])
    >>> [(c.tokens, c.start, c.match) for c in drafter.candidates()]
    [([7, 8, 5], 2, 2)]

Acceptance per depth: a copied token at chain depth d is worth drafting when P(tokens 1..d right) reaches the
break-even of one more verify node (CopyConfig.min_accept, set by tree_choice.choose_copy). P is the product of
conditional rates a_j = P(token j right | tokens before it right), estimated online per request and per match length
n (a continuation after a 4-token match is right more often than one after a single recurring token):
    a_j(n) = (accepted_j(n) + w * prior_j) / (tried_j(n) + w)       (Beta smoothing: w pseudo-counts of the prior)
tried_j(n) counts the drafted chains of match n whose first j-1 tokens were accepted (token j was really judged).
Beside a head, the tokens of a chain that the head's tree already holds cost nothing (they merge); the first one it
does not hold, at a place where the head drafted other tokens, is right less often than a_j says (the head was
wrong there more often than usual): it is judged by its own rate, counted apart,
    e(n) = (accepted_diverged(n) + w * diverge_prior) / (tried_diverged(n) + w)
so a request where copies only ever repeat what the head drafted anyway soon stops paying for nodes the head
rejected.

Head-free rounds: where a long match makes the copies alone likely to commit several tokens, the head's tree adds
little (it helps only at depths the copy gets wrong) and costs its draft and its verify nodes. With c_d the best
candidate's P(tokens 1..d right), L the copy nodes drafted and h_d the head tree's P(holds depth d) (CopyConfig):
    free round:  (1 + sum_d c_d) / (free_round_ms + free_node_ms * L)
    head round:  (1 + sum_d [1 - (1 - h_d)(1 - c_d)]) / (head_round_ms + node_ms * L)
and the round drafts no head tree when the first is higher (the head's pairs wait for the next round it drafts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import CopyConfig

SCAN_PER_NGRAM = 8  # earlier occurrences examined per suffix length: bounds a query on long runs of one token


@dataclass
class CopyCandidate:
    tokens: list[int]  # the continuation copied from the context
    start: int  # context position of tokens[0]: the source span is [start, start + len(tokens))
    match: int  # length of the suffix that matched before it (n of the n-gram)


@dataclass
class CopyBranch(CopyCandidate):
    # the tree's node scores: cumulative log P(tokens 1..d right), d = 1..len(tokens)
    scores: list[float] = field(default_factory=list)
    held: int = 0  # leading tokens the head's tree already holds (merged at no cost)
    diverged: bool = False  # the head drafted other tokens at the place of token held + 1


class CopyAcceptance:
    """Per-depth acceptance of copied tokens in one request, per match length: the prior, then the request's own
    counts (tried[n][d-1], accepted[n][d-1])."""

    def __init__(self, cfg: CopyConfig):
        self.cfg = cfg
        self.tried = {n: [0] * cfg.length for n in range(cfg.min_ngram, cfg.max_ngram + 1)}
        self.accepted = {n: [0] * cfg.length for n in range(cfg.min_ngram, cfg.max_ngram + 1)}
        self.diverged = {n: [0, 0] for n in range(cfg.min_ngram, cfg.max_ngram + 1)}  # [tried, accepted]

    def conditional(self, depth: int, match: int) -> float:
        """a_depth (1-based) after a match of `match` tokens, Beta-smoothed toward the prior (the prior's last entry
        holds for deeper tokens)."""
        prior = self.cfg.prior_at(depth, match)
        w = self.cfg.prior_weight
        return (self.accepted[match][depth - 1] + w * prior) / (self.tried[match][depth - 1] + w)

    def diverge_rate(self, match: int) -> float:
        """e(match): a copied token right where the head drafted others, Beta-smoothed toward diverge_prior."""
        tried, accepted = self.diverged[match]
        w = self.cfg.prior_weight
        return (accepted + w * self.cfg.diverge_prior) / (tried + w)

    def chain_logp(self, length: int, match: int) -> list[float]:
        """log P(tokens 1..d right) for d = 1..length: running sums of log a_j."""
        total, out = 0.0, []
        for depth in range(1, length + 1):
            total += math.log(self.conditional(depth, match))
            out.append(total)
        return out

    def observe(self, drafted: int, accepted: int, match: int, diverged_at: int = 0) -> None:
        """One chain of `drafted` tokens (after a match of `match`) whose first `accepted` the target accepted;
        diverged_at: the depth of its first token placed where the head drafted others (0: none), counted apart."""
        for depth in range(1, drafted + 1):
            if depth == diverged_at:
                if accepted >= depth - 1:
                    self.diverged[match][0] += 1
                    self.diverged[match][1] += accepted >= depth
            elif accepted >= depth - 1:
                self.tried[match][depth - 1] += 1
                self.accepted[match][depth - 1] += accepted >= depth


class CopyDrafter:
    """The n-gram index over one request's context and the branches it proposes each round.

    Engine calls: begin(prompt + [first token]); per round branches() -> the tree; after verify
    observe(branches, how many tokens of each entered the tree, accepted draft tokens) and extend(committed).
    """

    def __init__(self, cfg: CopyConfig):
        self.cfg, self.max_nodes = cfg, cfg.max_nodes
        self.context: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}
        self.acceptance = CopyAcceptance(cfg)
        self._round: list[CopyCandidate] | None = None  # this round's candidates (head_free, then branches)

    def begin(self, context: list[int]) -> None:
        self.context, self.ends, self.acceptance = [], {}, CopyAcceptance(self.cfg)
        self.extend(context)

    def extend(self, tokens: list[int]) -> None:
        """Append committed tokens; index the n-grams that end at each of them."""
        self._round = None
        for token in tokens:
            self.context.append(int(token))
            end = len(self.context) - 1
            for n in range(self.cfg.min_ngram, min(self.cfg.max_ngram, end + 1) + 1):
                self.ends.setdefault(tuple(self.context[end - n + 1:]), []).append(end)

    def candidates(self) -> list[CopyCandidate]:
        """Up to `branches` continuations of up to `length` tokens: longest match first, most recent first."""
        ctx, last, cfg = self.context, len(self.context) - 1, self.cfg
        found: list[CopyCandidate] = []
        if cfg.branches == 0 or cfg.length == 0:
            return found
        for n in range(min(cfg.max_ngram, len(ctx)), cfg.min_ngram - 1, -1):
            ends = self.ends[tuple(ctx[last - n + 1:])]  # ascending; its last entry is the suffix itself (at last)
            for p in reversed(ends[max(0, len(ends) - 1 - SCAN_PER_NGRAM):-1]):  # most recent earlier ones first
                tokens = ctx[p + 1:p + 1 + cfg.length]
                if any(c.tokens[:len(tokens)] == tokens for c in found):
                    continue  # the same branch again, or a prefix of one taken: no new node
                found.append(CopyCandidate(tokens, p + 1, n))
                if len(found) == cfg.branches:
                    return found
        return found

    def round_candidates(self) -> list[CopyCandidate]:
        """candidates(), computed once per round (the context changes only when tokens commit)."""
        if self._round is None:
            self._round = self.candidates()
        return self._round

    def head_free(self) -> bool:
        """Whether this round should draft no head tree (module docstring: the free round's expected tokens per
        ms against the head round's); never without the head's measured figures (CopyConfig.head_held)."""
        cfg = self.cfg
        if not cfg.head_held:
            return False
        chains = [[math.exp(s) for s in self._cut(c.tokens, self.acceptance.chain_logp(len(c.tokens), c.match))]
                  for c in self.round_candidates()]
        best = max(chains, key=sum, default=[])
        if not best:
            return False
        nodes = min(cfg.max_nodes, sum(map(len, chains)))
        span = max(len(best), len(cfg.head_held))
        c, h = best + [0.0] * (span - len(best)), list(cfg.head_held) + [0.0] * (span - len(cfg.head_held))
        free = (1.0 + sum(c)) / (cfg.free_round_ms + cfg.free_node_ms * nodes)
        head = (1.0 + sum(1.0 - (1.0 - hd) * (1.0 - cd) for hd, cd in zip(h, c))) / \
            (cfg.head_round_ms + cfg.node_ms * nodes)
        return free > head

    def _cut(self, tokens: list[int], scores: list[float]) -> list[float]:
        """The scores of the chain's leading tokens whose P(tokens 1..d right) reaches min_accept (scores fall with
        depth: the kept ones are a prefix)."""
        floor = math.log(self.cfg.min_accept) if self.cfg.min_accept > 0 else -math.inf
        return scores[:sum(1 for s in scores if s >= floor)]

    def branches(self, held=None) -> list[CopyBranch]:
        """The candidates cut where P(tokens 1..d right) falls under min_accept, with their node scores. held: the
        head tree's walk (tree.held_prefix; None without a head): where a chain leaves the head's tree at a place
        the head drafted others, that token's rate is e(n) instead of a_j (and so are the scores below it)."""
        out = []
        for candidate in self.round_candidates():
            n, tokens = candidate.match, candidate.tokens
            scores = self.acceptance.chain_logp(len(tokens), n)
            prefix, diverged = held(tokens) if held is not None else (0, False)
            diverged = diverged and prefix < len(tokens)
            if diverged:  # log a_{prefix+1} -> log e(n) from that token down
                shift = math.log(self.acceptance.diverge_rate(n)) - math.log(self.acceptance.conditional(prefix + 1, n))
                scores = scores[:prefix] + [s + shift for s in scores[prefix:]]
            keep = len(self._cut(tokens, scores))
            if keep:
                out.append(CopyBranch(tokens[:keep], candidate.start, n, scores[:keep], min(prefix, keep),
                                      diverged and keep > prefix))
        return out

    def observe(self, branches: list[CopyBranch], entered: list[int], accepted_tokens: list[int]) -> None:
        """entered: how many tokens of each branch made it into the tree (the node budget may cut one);
        accepted_tokens: the round's accepted drafts (root-down, bonus excluded). A branch starts at the root, so
        its accepted length is its common prefix with them."""
        for branch, length in zip(branches, entered):
            agree = 0
            while agree < min(length, len(accepted_tokens)) and branch.tokens[agree] == accepted_tokens[agree]:
                agree += 1
            diverged_at = branch.held + 1 if branch.diverged and length > branch.held else 0
            self.acceptance.observe(length, agree, branch.match, diverged_at)


class NoCopy:
    """The copy drafter of a method without copy branches: it proposes nothing and keeps no index."""

    max_nodes = 0

    def begin(self, context: list[int]) -> None:
        pass

    def extend(self, tokens: list[int]) -> None:
        pass

    def head_free(self) -> bool:
        return False

    def branches(self, held=None) -> list[CopyBranch]:
        return []

    def observe(self, branches: list[CopyBranch], entered: list[int], accepted_tokens: list[int]) -> None:
        pass

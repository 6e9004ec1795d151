"""The draft tree that maximises expected tokens per second, from measured costs and the head's measured acceptance.

Model of one round with a tree of depth D, top-k k and N draft nodes:

    tokens/s(D, k, N) = E[committed tokens per round] / (draft_ms(D, k) + verify_ms(N + 1) + overhead_ms) * 1000
    draft_ms(D, k)    = level_ms(rows=2) + D * level_ms(rows=k)     absorb (~tau pairs), then one head step per level
    verify_ms(n)      = the target's forward over n tree tokens after a cached context, plus logits (measured)
    E[committed]      = 1 + sum_{d=1..D} P(the tree holds the target's tokens at depths 1..d)       (bonus included)
    overhead_ms       = what a real round costs beyond the two microbenchmarks (commit, vocabulary update, host
                        reads, a longer context than the curves' 200 tokens): measured once on real rounds

The head's acceptance is measured once per head (`calibrate-head`, stored as acceptance.json beside its weights):
for held-out positions p, ranks[p][d-1] is the rank of the target's greedy token among the head's depth-d
candidates when the chain above it is right (teacher-forced unrolled drafting). A tree that keeps w_d candidates
under the right parent at depth d holds the path to depth d where ranks[p][j] < w_j for every j <= d, so

    P(depths 1..d held) = mean over p of [ranks[p][j] < w_j for all j <= d]      (correlations between depths kept)

EAGLE-2 spends its N nodes where the head's cumulative probability is highest; we give the widths the same
treatment with the measured probabilities: add nodes one at a time where they raise E[committed] most, at most
k per depth, ancestor-closed. Two simplifications pull opposite ways: every node is placed under the right
parent (a real tree also spends nodes under wrong ones: optimistic), and the shape is fixed for every round while
EAGLE-2 reshapes it per round from the head's confidence (pessimistic). So the model ranks trees; its tau is an
estimate, which docs/results.md sets next to the measured one (on the Zen 4 EPYC it was 6-8% high).

    >>> ranks = [[0, 0], [0, 1], [1, 0], [3, 3]]        # 4 positions, depth 2
    >>> round(expected_committed(ranks, (1, 1)), 2), round(expected_committed(ranks, (2, 2)), 2)
    (1.75, 2.5)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import CopyConfig, TreeConfig

ACCEPTANCE_FILE = "acceptance.json"
MAX_DEPTH, MAX_TOP_K, MAX_TOTAL = 8, 10, 64  # the candidate grid (CPU and GPU trees fit in it)


def load_acceptance(head_dir: str | Path | None) -> np.ndarray | None:
    """ranks [positions, depth] from a head folder's acceptance.json, or None when the head has none."""
    if head_dir is None:
        return None
    path = Path(head_dir) / ACCEPTANCE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return np.asarray(data["ranks"], dtype=np.int64)


def save_acceptance(head_dir: str | Path, ranks: np.ndarray, info: dict) -> Path:
    path = Path(head_dir) / ACCEPTANCE_FILE
    summary = {f"depth{d + 1}_top1_given_prev": round(float(_conditional(ranks, d)), 4)
               for d in range(ranks.shape[1])}
    path.write_text(json.dumps({**info, "positions": int(ranks.shape[0]), "depth": int(ranks.shape[1]),
                                "summary": summary, "ranks": ranks.tolist()}, separators=(",", ":")))
    return path


def _conditional(ranks: np.ndarray, depth: int) -> float:
    """P(rank 0 at `depth` | rank 0 at every earlier depth): the chain's top-1 acceptance at that depth."""
    alive = (ranks[:, :depth] == 0).all(axis=1)
    return float((ranks[alive, depth] == 0).mean()) if alive.any() else 0.0


def held_depths(ranks, widths: tuple[int, ...]) -> list[float]:
    """P(the tree holds the target's tokens at depths 1..d), d = 1.., for per-depth widths under the right parent."""
    ranks = np.asarray(ranks)
    alive = np.ones(ranks.shape[0], dtype=bool)
    out = []
    for depth, width in enumerate(widths):
        if width <= 0 or depth >= ranks.shape[1]:
            break
        alive &= ranks[:, depth] < width
        out.append(float(alive.mean()))
    return out


def expected_committed(ranks, widths: tuple[int, ...]) -> float:
    """E[tokens committed per round] (bonus included) for per-depth widths under the right parent."""
    return 1.0 + sum(held_depths(ranks, widths))


def best_widths(ranks: np.ndarray, depth: int, top_k: int, total: int) -> list[tuple[tuple[int, ...], float]]:
    """Greedy node placement for (depth, top_k): for n = 1..total nodes, (widths, E[committed])."""
    widths = [0] * depth
    out = []
    for _ in range(min(total, depth * top_k)):
        options = [d for d in range(depth) if widths[d] < top_k and (d == 0 or widths[d - 1] > 0)]
        gains = []
        for d in options:
            trial = widths.copy()
            trial[d] += 1
            gains.append((expected_committed(ranks, tuple(trial)), -d, d))  # ties: the shallower depth
        value, _, chosen = max(gains)
        widths[chosen] += 1
        out.append((tuple(widths), value))
    return out


@dataclass
class TreeChoice:
    tree: TreeConfig
    expected_tau: float | None  # the model's E[committed tokens per round]; None without a measurement
    expected_tokens_per_s: float | None
    draft_ms: float | None
    verify_ms: float | None
    reason: str  # one line: how it was chosen
    plain_ms: float | None = None  # one plain decoding step here: a one-token forward and its logits (measured)
    overhead_ms: float = 0.0  # per round, beyond draft + verify: the engine's bookkeeping (measured on real rounds)
    correction: str = ""  # how its costs were scaled to what a server measured (views/app_costs.py), if they were

    @classmethod
    def fixed(cls, tree: TreeConfig, reason: str) -> "TreeChoice":
        return cls(tree, None, None, None, None, reason)

    @property
    def round_ms(self) -> float | None:
        return None if self.draft_ms is None else self.draft_ms + self.verify_ms + self.overhead_ms

    @property
    def plain_tokens_per_s(self) -> float | None:
        return None if not self.plain_ms else 1e3 / self.plain_ms

    @property
    def break_even_tau(self) -> float | None:
        """Tokens a round must commit to match plain decoding: a round costs round_ms, plain decoding makes one
        token per plain_ms, so speculation pays exactly when tau > round_ms / plain_ms."""
        return None if not self.plain_ms or self.round_ms is None else self.round_ms / self.plain_ms

    @property
    def pays(self) -> bool | None:
        """Does the model expect this tree to beat plain decoding on this machine?"""
        if self.expected_tau is None or self.break_even_tau is None:
            return None
        return self.expected_tau > self.break_even_tau

    def to_json(self) -> dict:
        def r(value, digits):
            return None if value is None else round(value, digits)

        return {"tree": vars(self.tree), "expected_tau": r(self.expected_tau, 3),
                "expected_tokens_per_s": r(self.expected_tokens_per_s, 2), "draft_ms": r(self.draft_ms, 2),
                "verify_ms": r(self.verify_ms, 2), "overhead_ms": r(self.overhead_ms, 2),
                "round_ms": r(self.round_ms, 2), "plain_ms": r(self.plain_ms, 2),
                "plain_tokens_per_s": r(self.plain_tokens_per_s, 2), "break_even_tau": r(self.break_even_tau, 3),
                "pays": self.pays, "reason": self.reason}


def draft_cost(level_ms: Callable[[int], float], depth: int, top_k: int) -> float:
    """absorb the accepted tokens (~2 rows), then one head step per level over top_k rows"""
    return level_ms(2) + depth * level_ms(top_k)


def predict(ranks: np.ndarray, verify_ms: Callable[[int], float], level_ms: Callable[[int], float],
            tree: TreeConfig, overhead_ms: float = 0.0) -> TreeChoice:
    """The model's figures for a given tree (the chooser's, or one set by flags)."""
    depth = min(tree.depth, ranks.shape[1])
    placed = best_widths(ranks, depth, tree.top_k, tree.total_tokens)
    tau = placed[-1][1] if placed else 1.0
    draft, verify = draft_cost(level_ms, tree.depth, tree.top_k), verify_ms(tree.total_tokens + 1)
    return TreeChoice(tree, float(tau), 1e3 * tau / (draft + verify + overhead_ms), float(draft), float(verify),
                      "predicted for the tree as set", plain_ms=float(verify_ms(1)), overhead_ms=overhead_ms)


def choose_tree(ranks: np.ndarray, verify_ms: Callable[[int], float], level_ms: Callable[[int], float],
                max_depth: int = MAX_DEPTH, max_top_k: int = MAX_TOP_K, max_total: int = MAX_TOTAL,
                overhead_ms: float = 0.0) -> TreeChoice:
    """The (depth, top_k, total_tokens) of highest expected tokens/s (module docstring); ties: the smaller tree.
    overhead_ms: what a real round costs beyond draft + verify here (Session measures it once on real rounds)."""
    best = None
    for depth in range(1, min(max_depth, ranks.shape[1]) + 1):
        for top_k in range(1, max_top_k + 1):
            draft = draft_cost(level_ms, depth, top_k)
            for n, (widths, tau) in enumerate(best_widths(ranks, depth, top_k, max_total), start=1):
                if widths[-1] == 0 or max(widths) < top_k:  # shallower or narrower: another (D, k) covers it
                    continue
                verify = verify_ms(n + 1)
                speed = 1e3 * tau / (draft + verify + overhead_ms)
                key = (round(speed, 6), -n, -depth, -top_k)
                if best is None or key > best[0]:
                    best = (key, TreeConfig(depth=depth, top_k=top_k, total_tokens=n), float(tau), float(speed),
                            float(draft), float(verify))
    _, tree, tau, speed, draft, verify = best
    plain = float(verify_ms(1))
    round_ms = draft + verify + overhead_ms
    reason = (f"measured: depth {tree.depth}, top-k {tree.top_k}, {tree.total_tokens} nodes maximise expected "
              f"tokens/s ({tau:.2f} tokens per {round_ms:.0f} ms round)")
    if speed <= 1e3 / plain:
        reason += (f"; no tree beats plain decoding here ({speed:.1f} vs {1e3 / plain:.1f} tok/s predicted: a round "
                   f"must commit {round_ms / plain:.2f} tokens to break even)")
    return TreeChoice(tree, tau, speed, draft, verify, reason, plain_ms=plain, overhead_ms=overhead_ms)


def interpolate(points: dict[int, float]) -> Callable[[int], float]:
    """Piecewise-linear cost curve through measured (size, ms) points, extended flat-slope past the ends."""
    sizes = sorted(points)
    values = [points[s] for s in sizes]

    def cost(n: int) -> float:
        if len(sizes) == 1:
            return values[0]
        if n >= sizes[-1]:
            slope = (values[-1] - values[-2]) / (sizes[-1] - sizes[-2])
            return values[-1] + slope * (n - sizes[-1])
        return float(np.interp(n, sizes, values))

    return cost


def choose_copy(verify_ms: Callable[[int], float], round_ms: float, nodes: int, held: list[float],
                base: CopyConfig | None = None, free_round_ms: float | None = None) -> CopyConfig:
    """The copy branches' budget on this machine, beside a head tree of `nodes` nodes whose round costs round_ms
    and holds the target's tokens at depths 1..d with probability held[d-1] ([] and the plain step without a head).

    Per node (online, CopyConfig.min_accept): a round commits tau = 1 + sum(held) tokens in round_ms; one more
    verify node costs dv = verify_ms(nodes + 2) - verify_ms(nodes + 1) and adds its acceptance probability P:
        (tau + P) / (round_ms + dv) > tau / round_ms   <=>   P > dv * tau / round_ms      (the break-even P)
    Per round (max_nodes): the chain length L of highest expected tokens/s when a match exists, the copy right to
    depth d with c_d = prior_1 * ... * prior_d (the longest match's), independent of the head's own tree (either
    one holding depth d commits it):
        E[committed](L) = 1 + sum_d [1 - (1 - h_d)(1 - c_d)],  cost(L) = round_ms + verify_ms(nodes + 1 + L)
                          - verify_ms(nodes + 1);   max_nodes = L* (0: copies cannot pay here), shared by the
                          branches in their order (a later one gets the nodes an earlier, shorter one left)
    Head-free rounds (copy_draft.head_free), where free_round_ms (a round of the root alone: verify_ms(1) plus the
    bookkeeping) is given and there is a head tree: its held depths, its round, and the per-node verify costs beside
    it and beside the root alone, as straight lines over the copy length.
    """
    base = base or CopyConfig()

    def prior(depth: int) -> float:  # the longest match's row: the budget must let the likeliest copies in
        return base.prior_at(depth, base.max_ngram)

    def speed(length: int) -> float:
        chain = np.cumprod([prior(d) for d in range(1, length + 1)]).tolist()
        span = max(len(held), length)
        h = held + [0.0] * (span - len(held))
        c = chain + [0.0] * (span - length)
        committed = 1.0 + sum(1.0 - (1.0 - hd) * (1.0 - cd) for hd, cd in zip(h, c))
        return committed / (round_ms + verify_ms(nodes + 1 + length) - verify_ms(nodes + 1))

    best = max(range(base.length + 1), key=lambda length: (round(speed(length), 9), -length))
    tau = 1.0 + sum(held)
    node_ms = max(0.0, verify_ms(nodes + 2) - verify_ms(nodes + 1))
    chosen = replace(base, max_nodes=best, min_accept=min(1.0, node_ms * tau / round_ms))
    if free_round_ms is None or not held or best == 0:
        return chosen
    per_node = lambda base_nodes: max(0.0, verify_ms(base_nodes + 1 + best) - verify_ms(base_nodes + 1)) / best  # noqa: E731
    return replace(chosen, head_held=tuple(round(h, 4) for h in held), head_round_ms=round_ms,
                   node_ms=per_node(nodes), free_round_ms=free_round_ms, free_node_ms=per_node(0))


def describe_copy(copy: CopyConfig) -> str:
    """One line for the 'why this speed' panel."""
    if copy.max_nodes == 0:
        return "copy branches: none (an extra verify node costs more here than a copied token is expected to save)"
    line = (f"copy branches: up to {copy.branches} x {copy.length} tokens, at most {copy.max_nodes} extra nodes per "
            f"round; a copied token is drafted when P(accepted) >= {copy.min_accept:.2f} (the break-even of one "
            "more verify node here)")
    if copy.head_held:
        line += (f"; a round drafts copies alone (no head tree) when they are expected to commit faster: a round of "
                 f"{copy.free_round_ms:.0f} ms instead of {copy.head_round_ms:.0f}")
    return line

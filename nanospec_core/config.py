"""Configuration dataclasses: every knob with the reason it has its default.

One request is described by a GenerationConfig (what to produce), a TreeConfig (how the
draft tree is shaped) and a VocabConfig (which rows of the lm head the draft head scores).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """A named dtype ('auto' is decided by measurement in machine.py, for a loaded model's shapes)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# The one method registry the CLI, the benchmark and the app read: method -> its draft vocabulary policy (None for
# the methods without a draft head). vanilla: our KV-cached loop; hf / hf-lookup: transformers generate (plain /
# prompt lookup); eagle: EAGLE-2 with the full-vocabulary lm head; static: FR-Spec's frequency top-K; nanospec.
# '+copy': the same head tree plus branches copied from the context (decoding/copy_draft.py); lookup: copy branches
# alone, no head (the peer of hf-lookup).
METHODS = {"vanilla": None, "hf": None, "hf-lookup": None, "eagle": "full", "static": "static", "nanospec": "nanospec",
           "lookup": None, "eagle+copy": "full", "static+copy": "static", "nanospec+copy": "nanospec"}
DRAFT_METHODS = {method: policy for method, policy in METHODS.items() if policy}  # the methods that run the head
COPY_METHODS = ("lookup", "eagle+copy", "static+copy", "nanospec+copy")  # their trees take copy branches


# name: (low, high, integer?): the ONE table of setting bounds. The app's sliders and its API (ui.parse_settings)
# and the CLI (cli_args.decode_configs) check against it.
LIMITS = {
    "max_new_tokens": (1, 1024, True),
    "temperature": (0.0, 2.0, False),
    "seed": (0, 2**31 - 1, True),
    "depth": (1, 12, True),
    "top_k": (1, 32, True),
    "total_tokens": (1, 128, True),
    "capacity": (1, 65536, True),  # the static core and special ids must fit too (checked by the policy)
    "prompt_topk": (0, 16, True),
    "node_topk": (0, 16, True),
    "static_core": (0, 32768, True),
    "fallback_threshold": (0.0, 1.0, False),
}


def out_of_range(**values) -> list[str]:
    """'name low..high' for every given setting outside LIMITS (an empty list when all are fine)."""
    return [f"{name.replace('_', '-')} {LIMITS[name][0]}..{LIMITS[name][1]}" for name, value in values.items()
            if not LIMITS[name][0] <= value <= LIMITS[name][1]]


def check_limits(config) -> None:
    """Raise ValueError naming every field of `config` outside LIMITS (the dataclasses call it on creation)."""
    bad = out_of_range(**{name: getattr(config, name) for name in LIMITS if hasattr(config, name)})
    if bad:
        raise ValueError(f"{type(config).__name__} out of range: {', '.join(bad)}")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy: the output must equal plain greedy decoding token for token
    seed: int = 0  # sampling is reproducible for a given seed (one torch.Generator per request)
    stop_on_eos: bool = True

    def __post_init__(self):
        check_limits(self)


@dataclass
class TreeConfig:
    """EAGLE-2 dynamic tree shape. The default a Session uses is chosen by measurement (Session.tree_choice,
    decoding/tree_choice.py); these field defaults are the fallback for a head without an acceptance table.

    EAGLE's GPU defaults (60 nodes, depth 6, top-k 10) assume verification is nearly free. On this 2-core AVX2 CPU
    (float32) a target forward over 8 tokens costs 1.7x one token and 64 tokens 3.8x, and the shipped CPU-trained
    head commits ~2 tokens per round, so small trees measured fastest end to end: (3, 4, 7) beat (5, 8, 15) and
    (5, 8, 24) by 19% and 53% tokens/s with NanoSpec (docs/results.md). Deeper presets pay off with a stronger head.
    """

    depth: int = 3  # draft levels per round; bounds the tokens one round can commit at depth + 1
    top_k: int = 4  # children expanded per node, and nodes kept per level (best k of k*k)
    total_tokens: int = 7  # draft nodes verified per round (the root is extra): 8 tokens cost ~1.7x one token

    def __post_init__(self):
        check_limits(self)

    @classmethod
    def preset(cls, name: str) -> "TreeConfig":
        presets = {
            "cpu": cls(),
            "deep": cls(depth=5, top_k=8, total_tokens=24),  # for a head that accepts > 2.5 tokens per round
            "gpu": cls(depth=6, top_k=10, total_tokens=60),  # EAGLE-2's published defaults
            "chain": cls(depth=5, top_k=1, total_tokens=5),
        }
        if name not in presets:
            raise ValueError(f"unknown tree preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]


@dataclass
class VocabConfig:
    """Active-vocabulary policy knobs (NanoSpec's in-context set and the static baseline)."""

    static_k: int = 32768  # FR-Spec: the K most frequent tokens; 32k holds 96-98% of ShareGPT tokens (Qwen2.5)
    prompt_topk: int = 3  # target's top-k at every prompt position seeds the set (the paper's k = 3)
    node_topk: int = 10  # target's top-k absorbed at every verified tree node: 10 beat 3 by +0.03 coverage for
    # +30% active ids (docs/results.md); the node top-k is what anticipates the tokens the output has not used yet
    capacity: int = 4096  # bound on the active set (= rows in the persistent lm-head buffer)
    static_core: int = 1024  # always-active most-frequent tokens (function words, punctuation, code symbols): the
    # in-context set alone misses them at first use; 1024 lifted replayed coverage 0.87 -> 0.95 (0 = pure in-context)
    fallback_threshold: float = 0.0  # rolling hit rate under which one round drafts on the full vocabulary; 0 = off
    fallback_window: int = 8  # rounds in the rolling hit rate
    # dtype of the subset row buffer: 'auto' = the weight's, which the runtime probe chose as the fast one here
    buffer_dtype: str = "auto"

    def __post_init__(self):
        check_limits(self)


@dataclass
class CopyConfig:
    """Copy branches: continuations of the latest tokens found earlier in the context (decoding/copy_draft.py).

    The default a Session uses sets max_nodes and min_accept from this machine's verify costs (tree_choice.py,
    choose_copy); these field defaults are the fallback without measured costs.
    """

    max_ngram: int = 4  # longest suffix matched first: a 4-token match predicts its continuation better than 1
    min_ngram: int = 1  # shortest suffix tried when no longer one recurs (transformers' prompt lookup goes to 1)
    branches: int = 2  # candidate continuations per round (most recent occurrence of the longest match first)
    length: int = 16  # tokens per candidate: bounds the copied tokens one round can commit at length + 1; 16, not
    # 8: a summary copies whole clauses (8 held summarization under prompt lookup's 10), and min_accept cuts a chain
    # where its acceptance falls, so a short or unreliable match drafts short
    max_nodes: int = 16  # copy nodes a round may add to the tree (nodes merged with the head's tree are free)
    min_accept: float = 0.0  # a copy node is drafted only if its estimated acceptance probability reaches this:
    # the break-even of one more verify node (choose_copy); 0 = every candidate token within max_nodes
    # P(copied token d right | tokens before it right), d = 1, 2, 3+, one row per match length n = 1, 2, 3, 4+ (a
    # flat tuple: the same for every n). Measured on the committed corpus's answers (training/copy_rates.py: 3,598
    # answers); each request's own counts replace it as rounds go. A 1-token match is right a quarter of the time,
    # a 4-token match nine times in ten.
    prior: tuple = ((0.25, 0.52, 0.71), (0.5, 0.63, 0.78), (0.62, 0.7, 0.82), (0.89, 0.92, 0.95))
    prior_weight: float = 4.0  # pseudo-counts of the prior in the online estimate
    diverge_prior: float = 0.2  # P(a copied token right where the head drafted other tokens at its place): the
    # head was wrong there more often than usual, so the copy is right less often than prior[0] (a guess; each
    # request's own counts replace it)
    # Head-free rounds (CopyDrafter.head_free): a round drafts no head tree when the copies alone are expected to
    # commit more tokens per ms than the head's tree with them. choose_copy sets these from the measured costs;
    # head_held () = never (no costs measured, or no head).
    head_held: tuple = ()  # P(the head's tree holds the target's token at depth d), d = 1.. (its acceptance table)
    head_round_ms: float = 0.0  # a round with the head's tree: draft + verify + bookkeeping
    node_ms: float = 0.0  # one more verify node beside the head's tree
    free_round_ms: float = 0.0  # a round without it: verify of the root alone + bookkeeping
    free_node_ms: float = 0.0  # one more verify node beside the root alone

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram <= 16:
            raise ValueError(f"CopyConfig: need 1 <= min_ngram <= max_ngram <= 16, got {self.min_ngram}, "
                             f"{self.max_ngram}")
        if self.branches < 0 or self.length < 0 or self.max_nodes < 0 or not self.prior:
            raise ValueError("CopyConfig: branches, length and max_nodes must be >= 0, prior non-empty")
        if not all(0.0 < p < 1.0 for row in self.prior_rows for p in (*row, self.diverge_prior)) \
                or not all(self.prior_rows) or self.prior_weight <= 0:
            raise ValueError("CopyConfig: prior probabilities must lie in (0, 1), prior_weight > 0")

    @property
    def prior_rows(self) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(row) for row in self.prior) if isinstance(self.prior[0], (tuple, list)) else (self.prior,)

    def prior_at(self, depth: int, match: int) -> float:
        """The prior of copied token `depth` (1-based) after a `match`-token match: the last row holds for longer
        matches, a row's last entry for deeper tokens."""
        rows = self.prior_rows
        row = rows[min(match, len(rows)) - 1]
        return row[min(depth, len(row)) - 1]

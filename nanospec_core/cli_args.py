"""Command-line flags shared by the subcommands (model, dtype/device, tree and vocabulary knobs) and their configs.

Its own module so that __main__ and the tooling commands (bench, calibrate-head) import it without importing each
other.
"""
from __future__ import annotations

import argparse

from .errors import NanoSpecError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded", help="embedded | qwen2.5-coder-1.5b | hub id | local folder")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="auto = the fastest measured on this machine (cached); float32 = exact greedy equality "
                             "with plain decoding (bf16 can flip near-ties)")
    parser.add_argument("--device", default="auto", help="auto (CUDA where there is a GPU, else cpu) | cpu | cuda")
    parser.add_argument("--head", default=None,
                        help="EAGLE head: folder | hub id | random | eagle3 | eagle2 (the shipped head of that kind; "
                             "default: the first of paths.HEAD_KINDS that ships)")


def add_decode_args(parser: argparse.ArgumentParser) -> None:
    """Tree and vocabulary knobs shared by generate and bench (defaults from the config dataclasses)."""
    from .config import TreeConfig, VocabConfig

    vocab = VocabConfig()
    parser.add_argument("--tree-preset", default=None, choices=["cpu", "deep", "gpu", "chain"])
    measured = "default: the tree of highest expected tokens/s measured on this machine for the head"
    parser.add_argument("--depth", type=int, default=None, help=measured)
    parser.add_argument("--top-k", type=int, default=None, help=measured)
    parser.add_argument("--total-tokens", type=int, default=None, help=measured)
    parser.add_argument("--static-k", type=int, default=vocab.static_k)
    parser.add_argument("--capacity", type=int, default=vocab.capacity)
    parser.add_argument("--prompt-topk", type=int, default=vocab.prompt_topk)
    parser.add_argument("--node-topk", type=int, default=vocab.node_topk)
    parser.add_argument("--static-core", type=int, default=vocab.static_core)
    parser.add_argument("--fallback-threshold", type=float, default=vocab.fallback_threshold)


def decode_configs(args, session=None):
    """(TreeConfig, VocabConfig) from the flags. The tree: a preset, else the session's measured choice (or the
    fallback default without a session) with every tree flag the user gave taking precedence."""
    from .config import LIMITS, TreeConfig, VocabConfig, out_of_range

    if args.tree_preset:
        fields = vars(TreeConfig.preset(args.tree_preset))
    else:
        fields = vars(session.tree_choice().tree if session is not None else TreeConfig()).copy()
        fields.update({name: getattr(args, name) for name in ("depth", "top_k", "total_tokens")
                       if getattr(args, name) is not None})
    vocab_fields = dict(static_k=args.static_k, capacity=args.capacity, prompt_topk=args.prompt_topk,
                        node_topk=args.node_topk, static_core=args.static_core,
                        fallback_threshold=args.fallback_threshold)
    for what, values in (("tree", fields), ("vocabulary", vocab_fields)):  # one clear line, before the dataclass
        bad = out_of_range(**{k: v for k, v in values.items() if k in LIMITS})
        if bad:
            raise NanoSpecError(f"{what} settings out of range: {', '.join(bad)}")
    tree, vocab = TreeConfig(**fields), VocabConfig(**vocab_fields)
    return tree, vocab

"""The copy branches' prior, measured: how often a copied continuation is the target's next tokens, per match length.

Replays the copy drafter (decoding/copy_draft.py) over the committed corpus's training answers (the target's own
greedy answers, finished ones: an answer cut at its token limit often loops, and loops copy themselves): at every
answer position, the drafter's first candidate (longest match, most recent) is compared with the answer's next
tokens. Per match length n and depth d, the conditional rate
    a_d(n) = #(tokens 1..d right) / #(tokens 1..d-1 right)
is what CopyConfig.prior starts each request from. No model runs: the answers are token ids.

    python -m nanospec_core.training.copy_rates        # prints the rows CopyConfig's default holds
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from ..config import CopyConfig
from ..decoding.copy_draft import CopyDrafter

DEPTHS = 3  # entries per row: depths 1, 2 and 3+ (deeper rates are close to the third's)


def answers(folder: Path) -> list[dict]:
    """Finished training answers the target wrote (not read text), in a fixed shuffled order."""
    from .corpus import read_corpus

    items = [i for i in read_corpus(folder) if i["meta"]["split"] == "train" and i["meta"]["kind"] != "read"
             and i["meta"].get("finished")]
    random.Random(0).shuffle(items)
    return items


def copy_rates(items: list[dict], max_ngram: int = 4, depths: int = DEPTHS) -> tuple[tuple[float, ...], ...]:
    """Rows n = 1..max_ngram of a_d(n), d = 1..depths (the last one: every deeper token pooled)."""
    tried = {n: [0] * depths for n in range(1, max_ngram + 1)}
    right = {n: [0] * depths for n in range(1, max_ngram + 1)}
    for item in items:
        drafter = CopyDrafter(CopyConfig(max_ngram=max_ngram, branches=1, length=8))
        drafter.begin(item["prompt_ids"])
        answer = item["answer_ids"]
        for t, token in enumerate(answer):
            candidates = drafter.candidates()
            if candidates:
                first = candidates[0]
                for j, copied in enumerate(first.tokens[:len(answer) - t]):
                    row = min(j, depths - 1)
                    tried[first.match][row] += 1
                    if answer[t + j] != copied:
                        break
                    right[first.match][row] += 1
            drafter.extend([token])
    return tuple(tuple(round(r / t, 2) if t else 0.5 for r, t in zip(right[n], tried[n])) for n in tried)


def main(argv: list[str] | None = None) -> int:
    from ..paths import head_data

    parser = argparse.ArgumentParser(prog="python -m nanospec_core.training.copy_rates",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=head_data("qwen2.5-coder-0.5b-instruct"))
    parser.add_argument("--items", type=int, default=None, help="the first N answers (default: all)")
    args = parser.parse_args(argv)
    items = answers(Path(args.corpus))[:args.items]
    print(f"{len(items)} answers; rows n = 1..4, depths 1, 2, 3+:")
    print(copy_rates(items))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""python -m nanospec_vllm {answers | serve-bench}: run inside the vLLM virtual environment."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import answers

    parser = argparse.ArgumentParser(prog="python -m nanospec_vllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    answer = sub.add_parser("answers", help="the target answers head-training prompts (fast batched decoding)")
    answers.add_arguments(answer)
    answer.set_defaults(func=answers.run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""python -m nanospec_vllm {answers | serve-bench}: run inside the vLLM virtual environment."""
from __future__ import annotations

import argparse
import os
import sys


def reexec_with_engine_env(kv_cache_gib: int) -> None:
    """The engine's environment (phase.engine_env) must be there when the process starts: LD_PRELOAD only acts at
    exec, and vLLM reads its CPU settings in the processes it spawns. Without it the engine reserves one of two
    cores and sizes its memory from the NUMA node (which refused to start on a machine whose node held 10 of 24 GB)."""
    from .phase import engine_env

    env = engine_env(kv_cache_gib=kv_cache_gib)  # values already in the environment win, so this runs once
    if any(os.environ.get(key) != value for key, value in env.items()):
        os.execve(sys.executable, [sys.executable, "-m", "nanospec_vllm", *sys.argv[1:]], {**os.environ, **env})


def main(argv: list[str] | None = None) -> int:
    from . import answers

    parser = argparse.ArgumentParser(prog="python -m nanospec_vllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    answer = sub.add_parser("answers", help="the target answers head-training prompts (fast batched decoding)")
    answers.add_arguments(answer)
    answer.set_defaults(func=answers.run)
    args = parser.parse_args(argv)
    if argv is None:  # a command line: start again with the engine's environment if it is missing
        reexec_with_engine_env(kv_cache_gib=4)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

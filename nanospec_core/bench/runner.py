"""Spec-Bench-format benchmark: every method on every question, alternated, with per-prompt records and tables.

    questions = load_questions("question.jsonl", categories=["coding", "math"], limit=5)
    result = run_benchmark(session, questions, ["eagle", "nanospec"], GenerationConfig(max_new_tokens=128),
                           TreeConfig(), VocabConfig())
    print(result.table_markdown()); result.save("bench_out/run1")

Fair timing (Spec-Bench's protocol, adapted to one process):
- one short warm-up request per method first (lazy loads, allocator and kernel caches), thrown away;
- methods alternate per prompt (A B C A B C ...), so machine drift and thermal state hit every method alike;
- the same GenerationConfig (max_new_tokens, greedy by default) for all; Session.run synchronizes the device.
Aggregates: tokens/s = total new tokens / total wall per (category, method); speedup = that over the first
method's in the same category; tau = committed tokens per verification round (bonus token included).
When a method's greedy output differs from the first method's, the record carries the first differing position and
the target's top-2 logit margin there (float32, a fresh cache, the first method's context): a tiny margin says the
divergence is a bf16 near-tie, not a decoding bug.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import pandas as pd
import torch

from .cost_check import cost_table
from .report import make_progress, markdown  # noqa: F401 - markdown is part of this module's interface
from .store import load_previous, write_rows
from ..compare import first_difference, top2_margin
from ..config import COPY_METHODS, DRAFT_METHODS, GenerationConfig, TreeConfig, VocabConfig
from ..errors import NanoSpecError
from ..paths import DEFAULT_QUESTIONS

WARMUP_TOKENS = 16  # new tokens of the warm-up request: enough to run a few draft/verify rounds
SPLIT_PARTS = ("backbone", "lm_head", "gather", "tree")  # draft time = backbone + lm head + gather wait + tree


@dataclass
class Question:
    question_id: int | str
    category: str
    prompt: str  # the first turn


def load_questions(path: str | Path, categories: list[str] | None = None, limit: int | None = None) -> list[Question]:
    """First turn of each Spec-Bench question; `limit` questions per category at most (the first in the file).

    Returned round-robin over categories (the first question of each category, then the second, ...), so a
    partial or interrupted run still covers every category.
    """
    path = Path(path)
    if not path.is_file():
        raise NanoSpecError(f"questions file not found: {path}")
    if limit is not None and limit < 1:
        raise NanoSpecError("--limit must be at least 1")
    questions = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                turns = row["turns"]
                question = Question(row["question_id"], str(row["category"]), turns[0])
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                raise NanoSpecError(f"{path}:{number}: not a Spec-Bench question (needs question_id, category, "
                                    "turns)") from None
            if not isinstance(question.prompt, str) or not question.prompt.strip():
                raise NanoSpecError(f"{path}:{number}: the first turn is empty")
            questions.append(question)
    if not questions:
        raise NanoSpecError(f"no questions in {path}")
    known = list(dict.fromkeys(q.category for q in questions))
    if categories:
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise NanoSpecError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}: "
                                f"choose from {', '.join(known)}")
        questions = [q for q in questions if q.category in categories]
    by_category: dict[str, list[Question]] = {}
    for q in questions:
        by_category.setdefault(q.category, []).append(q)
    rounds = max(len(group) for group in by_category.values())
    if limit is not None:
        rounds = min(rounds, limit)
    return [group[i] for i in range(rounds) for group in by_category.values() if i < len(group)]


def record(question: Question, result, reference, prompt_ids, target, greedy: bool) -> dict:
    """One per-prompt row: the run summary, its accept lengths and draft split, and agreement with the reference."""
    s = result.summary
    row = {"question_id": question.question_id, "category": question.category, "method": result.method,
           "prompt_tokens": int(prompt_ids.numel()), "new_tokens": s.new_tokens, "wall_s": s.wall_s,
           "tokens_per_s": s.tokens_per_s, "prefill_s": s.prefill_s, "rounds": s.rounds,
           "accept_lengths": [step.accepted for step in result.steps if step.round > 0], "tau": s.mean_accepted,
           "draft_s": s.draft_s, "verify_s": s.verify_s, **{f"{p}_s": getattr(s, f"{p}_s") for p in SPLIT_PARTS},
           "avg_active_vocab": s.avg_active_vocab, "coverage": s.coverage, "fallback_rounds": s.fallback_rounds,
           "copy_nodes": s.copy_nodes, "copy_tokens": s.copy_tokens, "copy_share": s.copy_share,
           "head_free_rounds": s.head_free_rounds}
    ref_ids = result.token_ids if reference is None else reference.token_ids
    position = first_difference(ref_ids, result.token_ids)
    row.update(equal=position is None, first_diff=position, diff_margin=None, ref_token=None, token=None)
    if position is not None:
        row["ref_token"] = ref_ids[position] if position < len(ref_ids) else None
        row["token"] = result.token_ids[position] if position < len(result.token_ids) else None
        if greedy:  # a margin only explains a greedy divergence
            row["diff_margin"] = top2_margin(target, prompt_ids, ref_ids[:position])[0]
    row.update(text=result.text, token_ids=result.token_ids)
    return row


@dataclass
class BenchResult:
    methods: list[str]
    per_prompt: pd.DataFrame  # one row per (question, method); columns as built by `record`
    config: dict = field(default_factory=dict)  # model, dtype, gen/tree/vocab settings, for the saved summary
    interrupted: bool = False  # Ctrl-C: the rows are the prompts that finished for every method

    def summary_table(self) -> pd.DataFrame:
        """Per category, then 'overall': tokens/s, speedup vs the first method, tau, draft share, vocab, coverage."""
        df = self.per_prompt
        if df.empty:
            return pd.DataFrame(columns=SUMMARY_COLUMNS)
        groups = [(c, df[df.category == c]) for c in dict.fromkeys(df.category)] + [("overall", df)]
        rows = []
        for category, part in groups:
            base = None
            for method in self.methods:
                m = part[part.method == method]
                if m.empty:
                    continue
                tps = m.new_tokens.sum() / m.wall_s.sum() if m.wall_s.sum() > 0 else float("nan")
                base = tps if base is None else base
                rounds = m.rounds.sum()
                rows.append({"category": category, "method": method, "prompts": len(m), "tokens/s": tps,
                             "speedup": tps / base if base else float("nan"),
                             "tau": sum(map(sum, m.accept_lengths)) / rounds if rounds and m.tau.notna().any()
                             else None,
                             "draft share": m.draft_s.sum() / m.wall_s.sum() if m.wall_s.sum() > 0 else None,
                             "avg active vocab": m.avg_active_vocab.dropna().mean(),
                             "coverage": m.coverage.dropna().mean(), "equal rate": m.equal.mean(),
                             "copy share": m.copy_tokens.sum() / m.new_tokens.sum()
                             if "copy_tokens" in m and m.new_tokens.sum() else None,
                             "head-free rounds": m.head_free_rounds.sum() / rounds
                             if "head_free_rounds" in m and rounds else None})
        return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)

    def draft_table(self) -> pd.DataFrame:
        """Per draft method over all prompts: draft ms/round and its split, verify ms/round, ratios vs EAGLE."""
        df = self.per_prompt
        rows = []
        for method in self.methods:
            m = df[(df.method == method) & df.tau.notna() & (df.draft_s > 0)] if not df.empty else df
            if m.empty:
                continue
            rounds = m.rounds.sum()
            row = {"method": method, "rounds": int(rounds), "tau": sum(map(sum, m.accept_lengths)) / rounds,
                   "draft ms/round": 1e3 * m.draft_s.sum() / rounds, "verify ms/round": 1e3 * m.verify_s.sum() / rounds}
            row.update({f"{p} ms/round": 1e3 * m[f"{p}_s"].sum() / rounds for p in SPLIT_PARTS})
            rows.append(row)
        table = pd.DataFrame(rows)
        if not table.empty and "eagle" in set(table.method) and len(table) > 1:
            eagle = table[table.method == "eagle"].iloc[0]
            table["draft vs eagle"] = table["draft ms/round"] / eagle["draft ms/round"]
            table["tau vs eagle"] = table["tau"] / eagle["tau"]
        return table

    def table_markdown(self) -> str:
        summary = self.summary_table()
        parts = []
        if self.interrupted:
            parts.append("_Interrupted: the tables cover the prompts that finished for every method._\n")
        parts += ["## Overall\n", markdown(summary[summary.category == "overall"].drop(columns="category")),
                  "\n## Per category\n", markdown(summary[summary.category != "overall"])]
        draft = self.draft_table()
        if not draft.empty:
            parts += ["\n## Draft time per round (all prompts)\n", markdown(draft)]
            if {"eagle", "nanospec"} <= set(draft.method):
                row = draft[draft.method == "nanospec"].iloc[0]
                parts.append(f"\nNanoSpec / EAGLE: draft time x{row['draft vs eagle']:.3f}, "
                             f"tau x{row['tau vs eagle']:.3f}\n")
        costs = cost_table(self.per_prompt, self.config.get("tree_prediction"))
        if not costs.empty:
            parts += ["\n## The tree chooser's cost model against this run (nanospec, its tree)\n", markdown(costs)]
        diverged = self.per_prompt[~self.per_prompt.equal] if not self.per_prompt.empty else self.per_prompt
        if len(diverged) and diverged.diff_margin.notna().any():
            parts.append(f"\nOutputs differing from {self.methods[0]}: {len(diverged)}; target top-2 logit margin "
                         f"at the first difference: median {diverged.diff_margin.median():.4g}, "
                         f"max {diverged.diff_margin.max():.4g}\n")
        return "\n".join(parts)

    def figures(self) -> dict:
        """{'speedup': per-category speedup bars, 'draft_split': stacked draft time split per method} (Plotly)."""
        from .report import draft_split_figure, speedup_figure

        return {"speedup": speedup_figure(self.summary_table(), self.methods[0]),
                "draft_split": draft_split_figure(self.draft_table())}

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write per_prompt.jsonl/.csv, config.json, summary.md, speedup.html, draft_split.html (+ PNGs when
        kaleido works)."""
        from .report import write_figures

        out = Path(out_dir)
        written = [write_rows(self.per_prompt.to_dict(orient="records"), self.config, out),
                   out / "per_prompt.csv", out / "summary.md"]
        self.per_prompt.drop(columns=["token_ids"], errors="ignore").to_csv(written[1], index=False)
        header = "# NanoSpec benchmark\n\n" + "".join(f"- {k}: {v}\n" for k, v in self.config.items())
        written[2].write_text(header + "\n" + self.table_markdown(), encoding="utf-8")
        return written + write_figures(self.figures(), out)


SUMMARY_COLUMNS = ["category", "method", "prompts", "tokens/s", "speedup", "tau", "draft share", "avg active vocab",
                   "coverage", "copy share", "head-free rounds", "equal rate"]  # copy share: new tokens from copy
# branches; head-free rounds: the share of rounds that drafted copies alone (no head tree)


def check_methods(methods) -> list[str]:
    from ..config import METHODS

    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise NanoSpecError(f"methods must be distinct names from {', '.join(METHODS)}; "
                            f"got {', '.join(methods) or 'none'}")
    return methods


def runtime_config(runtime) -> dict:
    """Device and CPU weight layout of a RuntimeChoice (what the dtype probe decided besides the dtype)."""
    if runtime is None:
        return {}
    return {"device": runtime.device, "layout": f"{runtime.backbone_layout} backbone, {runtime.head_layout} lm head"}


def run_config(session, questions, methods, gen: GenerationConfig, tree: TreeConfig, vocab: VocabConfig,
               raw: bool) -> dict:
    """Everything that must match for two runs' records to be one benchmark (checked by --resume)."""
    return {"model": session.model_name, "head": getattr(session, "head_source", None),
            "dtype": str(session.dtype).removeprefix("torch."), **runtime_config(getattr(session, "runtime", None)),
            "methods": ", ".join(methods),
            "max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature, "seed": gen.seed,
            "tree": vars(tree), "vocab": vars(vocab), "questions": len(questions), "raw": raw}


def run_benchmark(session, questions: list[Question], methods: list[str], gen: GenerationConfig,
                  tree: TreeConfig | None = None, vocab: VocabConfig | None = None, warmup: bool = True,
                  progress: bool | Callable[[float, str], None] = True, raw: bool = False,
                  previous: list[dict] | None = None,
                  on_prompt: Callable[[list[dict]], None] | None = None) -> BenchResult:
    """Run every method on every question (alternating per prompt); Ctrl-C returns the finished prompts.

    previous: rows of an earlier run of the same benchmark (resume): questions that every method finished there
    are skipped and their rows kept. on_prompt(rows) is called after each finished prompt (checkpointing).
    """
    methods = check_methods(methods)
    if not questions:
        raise NanoSpecError("no questions to run")
    if tree is None:
        tree = session.tree_choice().tree if any(m in DRAFT_METHODS for m in methods) else TreeConfig()
    vocab = vocab or VocabConfig()
    config = run_config(session, questions, methods, gen, tree, vocab, raw)
    rows, interrupted = list(previous or []), False
    finished = {}
    for row in rows:
        finished.setdefault((row["category"], row["question_id"]), set()).add(row["method"])
    done = {key for key, seen in finished.items() if seen >= set(methods)}
    rows = [row for row in rows if (row["category"], row["question_id"]) in done]  # drop half-finished prompts
    questions = [q for q in questions if (q.category, q.question_id) not in done]
    total = len(questions) * len(methods) + (len(methods) if warmup and questions else 0)
    advance, close = make_progress(progress, total)
    try:
        if warmup and questions:  # thrown away: first-call costs (lazy head/frequency loads, allocator, kernels)
            short = GenerationConfig(max_new_tokens=min(WARMUP_TOKENS, gen.max_new_tokens),
                                     temperature=gen.temperature, seed=gen.seed)
            prompt_ids = session.encode(questions[0].prompt, raw)
            for method in methods:
                session.run(method, prompt_ids, short, tree, vocab)
                advance(f"warm-up {method}")
        for question in questions:
            prompt_ids = session.encode(question.prompt, raw)
            reference, prompt_rows = None, []
            for method in methods:
                result = session.run(method, prompt_ids, gen, tree, vocab)
                prompt_rows.append(record(question, result, reference, prompt_ids, session.target,
                                          greedy=gen.temperature <= 0))
                reference = reference or result
                advance(f"{question.category} #{question.question_id} {method}")
            rows += prompt_rows  # a prompt counts only once every method has run it (fair comparison)
            if on_prompt:
                on_prompt(rows)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        close()
    per_prompt = pd.DataFrame(rows)
    for column in ("first_diff", "ref_token", "token"):  # ints with gaps: keep them ints (nullable), not floats
        if column in per_prompt:
            per_prompt[column] = per_prompt[column].astype("Int64")
    for column in ("tau", "avg_active_vocab", "coverage", "diff_margin"):  # None -> NaN, for means and plots
        if column in per_prompt:
            per_prompt[column] = per_prompt[column].astype(float)
    return BenchResult(methods=methods, per_prompt=per_prompt, config=config, interrupted=interrupted)


# ---------------------------------------------------------------------------------------------------------
# Command line: python -m nanospec_core bench ... (model and decode knobs are added by __main__)


def add_arguments(parser) -> None:
    parser.add_argument("--questions", default=str(DEFAULT_QUESTIONS), help="Spec-Bench question.jsonl")
    parser.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="questions per category")
    parser.add_argument("--methods", default="eagle,nanospec", help="comma-separated; the first is the baseline")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="feed the prompts as is, without the chat template")
    parser.add_argument("--out", default=None, help="output folder (default: bench_out/<timestamp>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out: skip the prompts it finished (same settings required)")


def split_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def run(args) -> int:
    import sys

    from ..cli_args import decode_configs
    from ..decoding.tree_choice import describe_copy
    from ..session import Session

    questions = load_questions(args.questions, split_list(args.categories), args.limit)  # fail before loading
    methods = check_methods(split_list(args.methods) or [])
    decode_configs(args)  # bad tree settings fail before the model loads
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if args.resume and not args.out:
        raise NanoSpecError("--resume needs --out (the folder of the run to continue)")
    out = Path(args.out or Path("bench_out") / time.strftime("%Y%m%d-%H%M%S"))
    session = Session(args.model, dtype=args.dtype, device=args.device, head=args.head)
    drafting = any(m in DRAFT_METHODS for m in methods)  # hf / vanilla alone need no head
    tree, vocab = decode_configs(args, session if drafting else None)
    print(f"runtime: {session.runtime.describe()}", file=sys.stderr)
    if drafting:
        print(f"tree: {vars(tree)} ({session.tree_choice().reason})", file=sys.stderr)
    copies = {m: session.copy_choice(m) for m in methods if m in COPY_METHODS}
    for method, copy in copies.items():
        print(f"{method}: {describe_copy(copy)}", file=sys.stderr)
    config = run_config(session, questions, methods, gen, tree, vocab, args.raw)
    previous = load_previous(out, config) if args.resume else None
    result = run_benchmark(session, questions, methods, gen, tree, vocab, progress=True, raw=args.raw,
                           previous=previous, on_prompt=lambda rows: write_rows(rows, config, out))
    result.config.update(runtime=session.runtime.describe(), runtime_probe_ms=session.runtime.costs,
                         copy_choice={m: vars(copy) for m, copy in copies.items()} or None)
    if drafting:  # reported, not compared by --resume
        prediction = session.tree_prediction(tree)
        result.config.update(tree_choice=session.tree_choice().to_json(),
                             tree_prediction=prediction.to_json() if prediction else None)
    print(result.table_markdown())
    written = result.save(out)
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    if result.interrupted:
        print("interrupted: saved the prompts that finished", file=sys.stderr)
        return 130
    return 0

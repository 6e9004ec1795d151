"""The benchmark runner: question loading, fair alternation, divergence margins, tables, files and the bench CLI."""
import json

import pandas as pd
import pytest
import torch

from nanospec_core.bench.runner import BenchResult, first_difference, load_questions, record, run_benchmark
from nanospec_core.compare import top2_margin
from nanospec_core.config import GenerationConfig
from nanospec_core.errors import NanoSpecError
from nanospec_core.metrics import StepStats, summarize
from nanospec_core.models.target import TargetModel
from nanospec_core.session import RunResult
from tests.conftest import TINY_VOCAB, tiny_hf_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded shared CPU extra threads spin-wait (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_questions(path, per_category=2, categories=("coding", "writing", "math")):
    rows = []
    for c, category in enumerate(categories):
        for i in range(per_category + 1):  # one more than the limit used below
            rows.append({"question_id": 100 * c + i, "category": category,
                         "turns": [f"Question {i} about {category}: explain x{i} + y = z", "A second turn."]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- loading questions ---------------------------------------------------------------------------------------


def test_load_questions_takes_first_turn_and_limits_per_category(tmp_path):
    path = write_questions(tmp_path / "q.jsonl")
    questions = load_questions(path, categories=["writing", "coding"], limit=2)
    assert [(q.category, q.question_id) for q in questions] == [("coding", 0), ("writing", 100), ("coding", 1),
                                                                ("writing", 101)]  # round-robin
    assert questions[0].prompt.startswith("Question 0 about coding")
    assert len(load_questions(path)) == 9


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ('{"question_id": 1, "category": "qa", "turns": ["hi"]}\nnot json\n', ":2: not a Spec-Bench question"),
    ('{"question_id": 1, "category": "qa"}\n', ":1: not a Spec-Bench question"),
    ('{"question_id": 1, "category": "qa", "turns": []}\n', ":1: not a Spec-Bench question"),
    ('{"question_id": 1, "category": "qa", "turns": ["  "]}\n', "first turn is empty"),
    ("\n\n", "no questions"),
])
def test_load_questions_rejects_bad_files_with_a_clear_error(tmp_path, content, message):
    path = tmp_path / "q.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(NanoSpecError, match=message):
        load_questions(path)


def test_load_questions_rejects_unknown_category_and_bad_limit(tmp_path):
    path = write_questions(tmp_path / "q.jsonl")
    with pytest.raises(NanoSpecError, match="unknown category poetry: choose from coding, writing, math"):
        load_questions(path, categories=["coding", "poetry"])
    with pytest.raises(NanoSpecError, match="limit"):
        load_questions(path, limit=0)


def test_spec_bench_ships_inside_the_repository_and_loads():
    """The benchmark's default questions live in assets/ (a Space built from the repository carries them)."""
    from nanospec_core.bench.runner import DEFAULT_QUESTIONS
    from nanospec_core.paths import ASSETS

    assert DEFAULT_QUESTIONS == ASSETS / "spec_bench" / "question.jsonl" and DEFAULT_QUESTIONS.is_file()
    assert (ASSETS / "spec_bench" / "LICENSE").read_text().startswith("Apache License")
    assert len(load_questions(DEFAULT_QUESTIONS)) == 480
    questions = load_questions(DEFAULT_QUESTIONS, categories=["translation", "coding"], limit=3)
    assert [q.category for q in questions] == ["coding", "translation"] * 3


# --- divergence position and margin --------------------------------------------------------------------------


def test_first_difference_counts_a_length_difference_at_the_shorter_end():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2


@pytest.fixture(scope="module")
def tiny_target():
    model = tiny_hf_model("qwen2")
    return model, TargetModel(model)


def test_top2_margin_is_the_gap_between_the_two_best_full_forward_logits(tiny_target):
    model, target = tiny_target
    prompt, prefix = torch.tensor([5, 9, 200, 31]), [77, 1000]
    margin, top1, top2 = top2_margin(target, prompt, prefix)
    logits = model(torch.tensor([[5, 9, 200, 31, 77, 1000]])).logits[0, -1].float()
    values, indices = logits.topk(2)
    assert (top1, top2) == (int(indices[0]), int(indices[1]))
    assert margin == pytest.approx(float(values[0] - values[1]), rel=1e-4, abs=1e-4)


def fake_result(method, tokens, accepted=(), draft_ms=0.0):
    steps = [StepStats(round=0, tokens=tokens[:1], accepted=1, prefill_ms=1.0)]
    position = 1
    for r, n in enumerate(accepted, 1):
        steps.append(StepStats(round=r, tokens=tokens[position:position + n], accepted=n, draft_ms=draft_ms,
                               backbone_ms=draft_ms / 2, lm_head_ms=draft_ms / 4, gather_ms=draft_ms / 8,
                               tree_ms=draft_ms / 8, verify_ms=2.0, tree_size=4 if draft_ms else 0,
                               active_vocab=100 if draft_ms else None))
        position += n
    return RunResult(method=method, model="tiny", text="", token_ids=list(tokens),
                     summary=summarize(steps, wall_s=0.01 * len(steps)), steps=steps)


def test_a_divergent_record_carries_the_first_position_and_the_reference_margin(tiny_target):
    _, target = tiny_target
    from nanospec_core.bench.runner import Question

    prompt = torch.tensor([5, 9, 200, 31])
    reference = fake_result("vanilla", [10, 11, 12, 13], accepted=(1, 1, 1))
    other = fake_result("eagle", [10, 11, 99, 13], accepted=(2, 1), draft_ms=4.0)
    row = record(Question(7, "qa", "p"), other, reference, prompt, target, greedy=True)
    assert (row["equal"], row["first_diff"], row["ref_token"], row["token"]) == (False, 2, 12, 99)
    assert row["diff_margin"] == pytest.approx(top2_margin(target, prompt, [10, 11])[0])
    assert row["accept_lengths"] == [2, 1] and row["tau"] == 1.5
    same = record(Question(7, "qa", "p"), reference, reference, prompt, target, greedy=True)
    assert same["equal"] and same["first_diff"] is None and same["diff_margin"] is None


# --- the runner with a scripted session ----------------------------------------------------------------------


class ScriptedSession:
    """Records the call order; every method returns the same tokens; `interrupt_at` raises Ctrl-C on that call."""

    model_name, dtype, target = "scripted", torch.float32, None

    def __init__(self, interrupt_at=None):
        self.calls, self.interrupt_at = [], interrupt_at

    def encode(self, prompt, raw=False):
        return torch.tensor([1, 2, 3])

    def tree_choice(self):
        from nanospec_core.config import TreeConfig
        from nanospec_core.decoding.tree_choice import TreeChoice

        return TreeChoice.fixed(TreeConfig(), "scripted")

    def run(self, method, prompt_ids, gen, tree=None, vocab=None):
        self.calls.append((method, gen.max_new_tokens))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        draft = 0.0 if method in ("vanilla", "hf") else (2.0 if method == "nanospec" else 4.0)
        tokens = list(range(10, 10 + gen.max_new_tokens))
        accepted = (1,) * (len(tokens) - 1) if draft == 0 else (3,) * ((len(tokens) - 1) // 3)
        return fake_result(method, tokens[:1 + sum(accepted)], accepted, draft_ms=draft)


def test_methods_alternate_per_prompt_after_a_short_warmup(tmp_path):
    questions = load_questions(write_questions(tmp_path / "q.jsonl"), limit=1)
    session = ScriptedSession()
    seen = []
    result = run_benchmark(session, questions, ["vanilla", "eagle", "nanospec"], GenerationConfig(max_new_tokens=40),
                           progress=lambda fraction, text: seen.append(fraction))
    assert session.calls[:3] == [("vanilla", 16), ("eagle", 16), ("nanospec", 16)]
    assert [m for m, _ in session.calls[3:]] == ["vanilla", "eagle", "nanospec"] * 3
    assert {n for _, n in session.calls[3:]} == {40}
    assert seen[-1] == pytest.approx(1.0) and len(seen) == 12
    draft = result.draft_table().set_index("method")
    assert draft.loc["nanospec", "draft vs eagle"] == pytest.approx(0.5)
    assert draft.loc["nanospec", "tau vs eagle"] == pytest.approx(1.0)
    assert "NanoSpec / EAGLE: draft time x0.500" in result.table_markdown()


def test_ctrl_c_keeps_the_prompts_every_method_finished(tmp_path):
    questions = load_questions(write_questions(tmp_path / "q.jsonl"), limit=1)
    session = ScriptedSession(interrupt_at=2 + 2 * 2 + 1)  # warm-up 2, two prompts x 2 methods, then Ctrl-C
    result = run_benchmark(session, questions, ["vanilla", "eagle"], GenerationConfig(max_new_tokens=10),
                           progress=False)
    assert result.interrupted
    assert list(result.per_prompt.question_id) == [0, 0, 100, 100]
    written = result.save(tmp_path / "out")
    assert "Interrupted" in (tmp_path / "out" / "summary.md").read_text()
    assert all(p.exists() for p in written)


def test_unknown_or_repeated_methods_are_rejected():
    with pytest.raises(NanoSpecError, match="methods must be distinct"):
        run_benchmark(ScriptedSession(), [], ["vanilla", "medusa"], GenerationConfig())
    with pytest.raises(NanoSpecError, match="methods must be distinct"):
        run_benchmark(ScriptedSession(), [], ["eagle", "eagle"], GenerationConfig())


# --- end to end: the bench CLI on a tiny local model ---------------------------------------------------------


def test_bench_cli_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    from nanospec_core.__main__ import main

    questions = write_questions(tmp_path / "q.jsonl", categories=("coding", "writing"))
    out = tmp_path / "out"
    code = main(["bench", "--model", tiny_model_dir, "--head", "random", "--dtype", "float32",
                 "--questions", str(questions), "--limit", "2", "--methods", "vanilla,eagle,nanospec,hf",
                 "--max-new-tokens", "12", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    for name in ("per_prompt.jsonl", "per_prompt.csv", "summary.md", "speedup.html", "draft_split.html"):
        assert (out / name).is_file(), name
    header = ("| method | prompts | tokens/s | speedup | tau | draft share | avg active vocab | coverage | copy share | "
              "head-free rounds | equal rate |")
    assert header in stdout and "## Per category" in stdout and "## Draft time per round" in stdout

    rows = [json.loads(line) for line in (out / "per_prompt.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4
    assert [r["method"] for r in rows[:8]] == ["vanilla", "eagle", "nanospec", "hf"] * 2
    assert all(r["equal"] for r in rows), [(r["method"], r["first_diff"], r["diff_margin"]) for r in rows]
    assert all(r["new_tokens"] == len(r["token_ids"]) <= 12 for r in rows)
    nanospec = [r for r in rows if r["method"] == "nanospec"]
    assert all(r["avg_active_vocab"] and r["avg_active_vocab"] < TINY_VOCAB for r in nanospec)
    assert all(sum(r["accept_lengths"]) + 1 == r["new_tokens"] for r in nanospec)

    csv = pd.read_csv(out / "per_prompt.csv")
    assert {"question_id", "category", "method", "tokens_per_s", "tau", "draft_s", "backbone_s", "lm_head_s",
            "gather_s", "tree_s", "coverage", "equal", "first_diff", "diff_margin"} <= set(csv.columns)
    summary = BenchResult(["vanilla", "eagle", "nanospec", "hf"], pd.read_json(out / "per_prompt.jsonl",
                                                                                lines=True)).summary_table()
    assert set(summary.category) == {"coding", "writing", "overall"}
    assert (summary["equal rate"] == 1.0).all()
    assert (summary[summary.method == "vanilla"].speedup == 1.0).all()


def test_bench_cli_runs_the_copy_methods_beside_their_peers(tiny_model_dir, tmp_path, capsys):
    """lookup (copy branches alone), nanospec+copy and transformers' prompt lookup in one run: every output equals
    plain greedy decoding (float32), the copy methods draft copy nodes, and the tables carry their copy share."""
    from nanospec_core.__main__ import main

    phrase = "alpha beta gamma delta epsilon"
    rows = [{"question_id": i, "category": category, "turns": [f"Repeat: {phrase}. {phrase}. {phrase} x{i}"]}
            for i, category in enumerate(("summarization", "rag"))]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    methods = ["vanilla", "lookup", "nanospec", "nanospec+copy", "eagle+copy", "hf-lookup"]
    out = tmp_path / "out"
    assert main(["bench", "--model", tiny_model_dir, "--head", "random", "--dtype", "float32", "--questions",
                 str(questions), "--methods", ",".join(methods), "--max-new-tokens", "16", "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    assert "lookup: copy branches: up to" in stderr  # the copy budget is reported
    records = [json.loads(line) for line in (out / "per_prompt.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == methods * 2
    assert all(r["equal"] for r in records), [(r["method"], r["first_diff"]) for r in records]
    for method in ("lookup", "nanospec+copy", "eagle+copy"):  # an output token recurs: its continuation is drafted
        assert sum(r["copy_nodes"] for r in records if r["method"] == method) > 0, method
    assert all(r["copy_nodes"] == 0 and r["copy_tokens"] == 0 for r in records if r["method"] == "nanospec")
    summary = BenchResult(methods, pd.DataFrame(records)).summary_table()
    assert set(summary.category) == {"summarization", "rag", "overall"}
    assert set(summary[summary.category == "rag"].method) == set(methods)
    assert summary["copy share"].between(0, 1).all() and "copy share" in stdout
    config = json.loads((out / "config.json").read_text())
    assert set(config["copy_choice"]) == {"lookup", "nanospec+copy", "eagle+copy"}


def test_bench_cli_reports_a_bad_category_without_loading_a_model(tmp_path, capsys):
    from nanospec_core.__main__ import main

    questions = write_questions(tmp_path / "q.jsonl")
    assert main(["bench", "--model", "no-such-model", "--questions", str(questions), "--categories", "poetry"]) == 2
    assert "unknown category poetry" in capsys.readouterr().err


# --- resume: a long run survives a kill -----------------------------------------------------------------------


def test_resume_skips_finished_prompts_and_drops_half_finished_ones(tmp_path):
    from nanospec_core.bench.store import write_rows

    questions = load_questions(write_questions(tmp_path / "q.jsonl"), limit=1)
    saved = []
    first = run_benchmark(ScriptedSession(interrupt_at=2 + 2 * 2 + 1), questions, ["vanilla", "eagle"],
                          GenerationConfig(max_new_tokens=10), progress=False,
                          on_prompt=lambda rows: saved.append(len(rows)))
    assert first.interrupted and saved == [2, 4]  # checkpointed after each finished prompt
    rows = first.per_prompt.to_dict(orient="records")
    half = {**rows[0], "question_id": questions[2].question_id, "category": questions[2].category}
    write_rows(rows + [half], first.config, tmp_path / "run")  # the third prompt got through vanilla only

    session = ScriptedSession()
    from nanospec_core.bench.store import load_previous
    previous = load_previous(tmp_path / "run", first.config)
    result = run_benchmark(session, questions, ["vanilla", "eagle"], GenerationConfig(max_new_tokens=10),
                           progress=False, previous=previous)
    assert [m for m, _ in session.calls] == ["vanilla", "eagle"] * (1 + len(questions) - 2)  # warm-up + the rest
    assert list(result.per_prompt.question_id[:4]) == [0, 0, 100, 100]
    assert len(result.per_prompt) == 2 * len(questions)
    assert list(result.per_prompt.wall_s[:4]) == [r["wall_s"] for r in rows]  # kept, not re-measured


def test_resume_refuses_a_run_with_other_settings(tmp_path):
    from nanospec_core.bench.store import load_previous, write_rows

    write_rows([{"question_id": 1, "category": "qa", "method": "eagle"}], {"max_new_tokens": 128, "tree": {"depth": 3}},
               tmp_path)
    with pytest.raises(NanoSpecError, match=r"settings differ \(max_new_tokens, tree\)"):
        load_previous(tmp_path, {"max_new_tokens": 64, "tree": {"depth": 5}})
    assert load_previous(tmp_path, {"max_new_tokens": 128, "tree": {"depth": 3}})[0]["method"] == "eagle"
    assert load_previous(tmp_path / "empty", {}) == []


def test_bench_cli_resume_runs_only_the_missing_prompts(tiny_model_dir, tmp_path, capsys):
    from nanospec_core.__main__ import main

    questions = write_questions(tmp_path / "q.jsonl", categories=("coding", "writing"))
    out = tmp_path / "out"
    args = ["bench", "--model", tiny_model_dir, "--head", "random", "--dtype", "float32", "--questions",
            str(questions), "--limit", "1", "--methods", "vanilla,eagle", "--max-new-tokens", "8", "--out", str(out)]
    assert main(args) == 0
    rows = (out / "per_prompt.jsonl").read_text().splitlines()
    (out / "per_prompt.jsonl").write_text("\n".join(rows[:2]) + "\n")  # as if killed during the second prompt
    assert main(args + ["--resume"]) == 0
    resumed = (out / "per_prompt.jsonl").read_text().splitlines()
    assert resumed[:2] == rows[:2] and len(resumed) == 4
    assert main(args[:-4] + ["--max-new-tokens", "9", "--out", str(out), "--resume"]) == 2
    assert "settings differ (max_new_tokens)" in capsys.readouterr().err
    assert main(args[:-2] + ["--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err

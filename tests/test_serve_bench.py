"""serve-bench's report (nanospec_core/bench/serve.py), from phase results as nanospec_vllm.phase writes them."""
from pathlib import Path

import pytest

from nanospec_core.bench.serve import first_difference, summarise, vllm_python
from nanospec_core.errors import NanoSpecError


def phase(outputs, tokens_per_s, accepted=None, margins=None, active=None):
    result = {"outputs": outputs, "tokens_per_s": tokens_per_s, "new_tokens": sum(map(len, outputs)), "wall_s": 1.0}
    if accepted is not None:
        result["spec"] = {"acceptance_length": accepted}
    if margins is not None:
        result["margins"] = margins
    if active is not None:
        result["nanospec"] = [{"avg_active": active, "avg_scored_rows": active + 10, "full_rows": 0}]
    return result


def test_summary_ratios_equality_and_the_margin_where_an_output_first_differs():
    plain = phase([[1, 2, 3], [4, 5, 6]], 10.0, margins=[[2.0, 0.125, 1.0], [3.0, 3.0, 3.0]])
    results = {("plain", 1): plain,
               ("eagle3", 1): phase([[1, 2, 3], [4, 5, 6]], 9.0, accepted=1.5),
               ("nanospec", 1): phase([[1, 7, 3], [4, 5, 6]], 12.0, accepted=1.5, active=1000.0)}
    rows = {row["config"]: row for row in summarise(results)}
    assert rows["nanospec"]["vs_plain"] == pytest.approx(1.2) and rows["eagle3"]["vs_plain"] == pytest.approx(0.9)
    assert rows["eagle3"]["equal"] == "2/2" and rows["nanospec"]["equal"] == "1/2"
    assert rows["nanospec"]["first_diffs"] == [1] and rows["nanospec"]["margins_at_diff"] == [0.125]
    assert rows["nanospec"]["avg_active"] == 1000.0 and rows["eagle3"]["avg_active"] is None


def test_first_difference_counts_a_shorter_output():
    assert first_difference([1, 2], [1, 2]) is None
    assert first_difference([1, 2], [1, 2, 3]) == 2 and first_difference([1, 3], [1, 2]) == 1


def test_a_missing_vllm_environment_is_a_clear_error(tmp_path):
    with pytest.raises(NanoSpecError, match="scripts/vllm_venv.sh"):
        vllm_python(str(tmp_path / "nope" / "python"))


def test_a_phase_decodes_batch_1_on_the_first_prompts_and_larger_batches_in_waves(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "vllm_plugin"))
    from nanospec_vllm.phase import measure

    calls = []

    def decode(batch):  # vLLM's generate: one output per prompt, in order
        calls.append([k for k, _ in batch])
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[k, k], logprobs=None)]) for k, _ in batch]

    inputs = [(k, f"prompt {k}") for k in range(10)]
    one = measure(None, decode, inputs, 1, speculative=False, batch1_prompts=3)
    assert calls == [[0], [1], [2]] and one["outputs"] == [[0, 0], [1, 1], [2, 2]] and one["new_tokens"] == 6
    calls.clear()
    four = measure(None, decode, inputs, 4, speculative=False, batch1_prompts=3)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and four["outputs"] == [[k, k] for k in range(10)]

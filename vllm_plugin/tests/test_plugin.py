"""The plugin inside a real vLLM engine, on a tiny random Qwen2 target and a random EAGLE-3 head (float32, CPU).

Runs in the vLLM virtual environment with the plugin installed (`.ci/run` builds it; tests/test_vllm_plugin.py
starts this suite from the project's own tests). Each engine runs in its own process (nanospec_vllm.phase).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
from nanospec_vllm.phase import engine_env  # noqa: E402
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # nanospec_core builds and exports the head, as for the real target

VOCAB, CORE = 4096, list(range(64))


def build_target(folder: Path, constant: bool = False):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).float().eval()
    if constant:  # every logit 0: the greedy choice is always id 0, for the target and a head sharing its lm head
        torch.nn.init.zeros_(model.lm_head.weight)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from nanospec_core.models.eagle import random_head
    from nanospec_core.models.eagle_checkpoint import export_checkpoint
    from nanospec_core.models.target import TargetModel
    import torch

    root = tmp_path_factory.mktemp("tiny")
    target = TargetModel(build_target(root / "target"))
    head = random_head(target, "eagle3", seed=1, tied_lm_head=True)
    export_checkpoint(head, root / "eagle3", dtype=torch.float32)
    export_checkpoint(head, root / "nanospec", dtype=torch.float32,
                      nanospec={"static_core": CORE, "capacity": 1024, "buffer_capacity": 2048})
    constant = TargetModel(build_target(root / "constant", constant=True))
    export_checkpoint(random_head(constant, "eagle3", seed=1, tied_lm_head=True), root / "constant_head",
                      dtype=torch.float32, nanospec={"static_core": CORE})
    rng = torch.Generator().manual_seed(3)
    prompts = [torch.randint(100, 1100, (24,), generator=rng).tolist() for _ in range(4)]
    return {"root": root, "prompts": prompts}


def phase(tiny, name: str, draft: str | None, env: dict | None = None, target: str = "target", **options) -> dict:
    spec = {"model": str(tiny["root"] / target), "draft": draft and str(tiny["root"] / draft), "dtype": "float32",
            "max_model_len": 256, "batches": [4], "prompts": tiny["prompts"], "max_tokens": 40, "ignore_eos": True,
            "eager": True, "num_speculative_tokens": 3, **options}
    spec_path, out = tiny["root"] / f"{name}.json", tiny["root"] / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    run = subprocess.run([sys.executable, "-m", "nanospec_vllm.phase", str(spec_path), str(out)],
                         env={**os.environ, **engine_env(kv_cache_gib=1), **(env or {})},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())["4"]


@pytest.fixture(scope="module")
def greedy(tiny):
    return {"plain": phase(tiny, "plain", None),
            "nanospec": phase(tiny, "nanospec", "nanospec", env={"NANOSPEC_VLLM_RECORD": "1"})}


def test_greedy_output_equals_vllm_without_speculation(greedy):
    assert greedy["nanospec"]["outputs"] == greedy["plain"]["outputs"]
    assert greedy["nanospec"]["spec"]["drafts"] > 0  # the drafts were really made and verified


def test_drafts_come_only_from_each_requests_active_set(greedy):
    stats = greedy["nanospec"]["nanospec"][0]
    record = stats["record"]
    assert len(record) >= 4 * 3  # every request drafted several positions through the plugin
    assert all(row["in_set"] for row in record)
    # the restriction is real: the unrestricted head would often have drafted an id outside the set
    assert sum(not row["full_in_set"] for row in record) > len(record) // 2
    assert stats["avg_active"] < VOCAB / 4 and stats["full_rows"] == 0
    assert stats["requests"] == 4 and stats["avg_scored_rows"] < VOCAB


def test_sampling_runs_with_the_restricted_draft_distribution(tiny):
    result = phase(tiny, "sampled", "nanospec", env={"NANOSPEC_VLLM_RECORD": "1"}, temperature=1.0,
                   draft_sample_method="probabilistic", seed=7)
    assert result["spec"]["drafts"] > 0 and all(len(ids) == 40 for ids in result["outputs"])
    assert all(row["in_set"] for row in result["nanospec"][0]["record"])


def test_accepted_drafts_commit_the_targets_own_tokens(tiny):
    """A target whose greedy choice is always id 0 and a head sharing its lm head: every draft is accepted, so the
    accepted path (not only rejections) goes through the plugin's logits."""
    result = phase(tiny, "constant", "constant_head", target="constant")
    assert result["outputs"] == [[0] * 40] * 4
    assert result["spec"]["accepted"] == result["spec"]["draft_tokens"] > 0
    assert result["spec"]["acceptance_length"] == 4.0  # 3 drafts + the bonus token per round

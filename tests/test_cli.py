"""The CLI contract: one JSON object with the documented keys; one clear error line (no traceback) on bad input."""
import json
import subprocess
import sys

import pytest

from nanospec_core.__main__ import main

SUMMARY_KEYS = {"new_tokens", "wall_s", "tokens_per_s", "rounds", "mean_accepted", "draft_s", "verify_s",
                "avg_active_vocab", "coverage"}
STEP_KEYS = {"accepted", "active_vocab", "hit", "draft_ms", "verify_ms"}


def generate(capsys, model_dir, *extra):
    code = main(["generate", "--model", model_dir, "--head", "random", "--dtype", "float32", "--prompt",
                 "write python code", "--max-new-tokens", "12", "--json", *extra])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)


def test_generate_json_contract_and_methods_agree(capsys, tiny_model_dir):
    results = {m: generate(capsys, tiny_model_dir, "--method", m) for m in ("vanilla", "hf", "eagle", "nanospec")}
    for method, data in results.items():
        assert {"method", "model", "text", "token_ids", "summary", "steps"} <= data.keys()
        assert SUMMARY_KEYS <= data["summary"].keys()
        assert data["method"] == method and len(data["token_ids"]) == 12
        assert all(STEP_KEYS <= step.keys() for step in data["steps"])
    assert len({tuple(d["token_ids"]) for d in results.values()}) == 1
    assert results["nanospec"]["summary"]["avg_active_vocab"] < results["eagle"]["summary"]["avg_active_vocab"]
    assert results["vanilla"]["summary"]["avg_active_vocab"] is None
    runtime = results["eagle"]["runtime"]
    assert runtime["dtype"] == "float32" and runtime["source"] == "given" and runtime["device"] == "cpu"
    assert runtime["backbone_layout"] in ("row", "column") and "float32" in runtime["summary"]
    assert results["eagle"]["tree"] == results["eagle"]["tree_choice"]["tree"]  # random head: the fixed default
    assert "no acceptance table" in results["eagle"]["tree_choice"]["reason"]


def test_generate_runs_the_copy_methods_and_reports_their_budget(capsys, tiny_model_dir):
    reference = generate(capsys, tiny_model_dir, "--method", "vanilla")["token_ids"]
    for method in ("lookup", "nanospec+copy"):
        data = generate(capsys, tiny_model_dir, "--method", method)
        assert data["token_ids"] == reference and data["copy"]["max_nodes"] > 0  # random head: the fallback budget
        assert {"copy_nodes", "copy_tokens", "copy_share"} <= data["summary"].keys()
        assert all({"copy_nodes", "copy_accepted"} <= step.keys() for step in data["steps"])
    assert generate(capsys, tiny_model_dir, "--method", "nanospec")["copy"] is None


def test_explicit_tree_flags_win_over_the_default(capsys, tiny_model_dir):
    data = generate(capsys, tiny_model_dir, "--method", "eagle", "--depth", "2", "--total-tokens", "5")
    assert data["tree"] == {"depth": 2, "top_k": 4, "total_tokens": 5}
    assert max(step["accepted"] for step in data["steps"]) <= 3  # depth 2 + the bonus token


def test_sampling_is_reproducible_for_a_seed(capsys, tiny_model_dir):
    first = generate(capsys, tiny_model_dir, "--method", "nanospec", "--temperature", "0.8", "--seed", "3")
    again = generate(capsys, tiny_model_dir, "--method", "nanospec", "--temperature", "0.8", "--seed", "3")
    assert first["token_ids"] == again["token_ids"]


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "/nonexistent/folder-or-id", "--prompt", "hi"], "unknown model"),
    (["generate", "--prompt", "   ", "--method", "vanilla"], "prompt is empty"),
    (["generate", "--prompt", "hi", "--depth", "0"], "tree settings out of range"),
])
def test_bad_input_gives_one_error_line(args, message, tiny_model_dir):
    if "--model" not in args:
        args = args[:1] + ["--model", tiny_model_dir, "--head", "random"] + args[1:]
    proc = subprocess.run([sys.executable, "-m", "nanospec_core", *args], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": "/tmp"}, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_unknown_method_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "hi", "--method", "nope"])
    assert exit_info.value.code == 2


def test_the_config_dataclasses_check_the_one_limits_table():
    import pytest

    from nanospec_core.config import LIMITS, GenerationConfig, TreeConfig, VocabConfig

    with pytest.raises(ValueError, match="depth 1..12"):
        TreeConfig(depth=LIMITS["depth"][1] + 1)
    with pytest.raises(ValueError, match="capacity 1..65536.*node-topk 0..16"):
        VocabConfig(capacity=0, node_topk=99)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1.0)
    assert TreeConfig(depth=12).depth == 12  # the bounds themselves are allowed


def test_export_head_writes_the_public_eagle3_layout_and_refuses_eagle2(capsys, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from nanospec_core.models.eagle import random_head
    from nanospec_core.models.eagle_checkpoint import save_head
    from nanospec_core.session import Session

    session = Session(tiny_model_dir, dtype="float32", device="cpu", head="random", progress=False)
    save_head(random_head(session.target, "eagle3", seed=1, tied_lm_head=True), tmp_path / "tied")
    code = main(["export-head", "--model", tiny_model_dir, "--dtype", "float32", "--head", str(tmp_path / "tied"),
                 "--out", str(tmp_path / "public")])
    assert code == 0 and "EAGLE-3 head" in capsys.readouterr().out
    weights = load_file(str(tmp_path / "public" / "model.safetensors"))
    assert weights["lm_head.weight"].shape[0] == session.target.vocab_size
    assert json.loads((tmp_path / "public" / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    assert main(["export-head", "--model", tiny_model_dir, "--dtype", "float32", "--head", "random",
                 "--out", str(tmp_path / "nope")]) == 2
    assert "only EAGLE-3 heads" in capsys.readouterr().err
    # the vLLM plugin's variant: its architecture, the static core (with the stop ids), the same weights
    assert main(["export-head", "--model", tiny_model_dir, "--dtype", "float32", "--head", str(tmp_path / "tied"),
                 "--out", str(tmp_path / "plugin"), "--nanospec-vllm"]) == 0
    config = json.loads((tmp_path / "plugin" / "config.json").read_text())
    assert config["architectures"] == ["NanoSpecLlamaForCausalLMEagle3"]
    assert set(session.stop_ids) <= set(config["nanospec"]["static_core"]) and config["nanospec"]["capacity"] > 0
    assert load_file(str(tmp_path / "plugin" / "model.safetensors")).keys() == weights.keys()

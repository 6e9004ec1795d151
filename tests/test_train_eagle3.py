"""EAGLE-3 training on a tiny random Qwen2 target: aux-layer features from one forward, a few steps lower the
loss, the tied lm head stays the target's, and the public export round-trips through the loader."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from nanospec_core.models.eagle import random_head
from nanospec_core.models.eagle_checkpoint import export_checkpoint, load_head, save_head
from nanospec_core.models.target import TargetModel
from nanospec_core.training import data as train_data
from nanospec_core.training.sources import code_prompts
from nanospec_core.training.loss import input_features
from nanospec_core.training.trainer import make_head, train

from .conftest import tiny_hf_model

AUX = (1, 2, 3)  # a 4-layer target: inputs of layers 1..3


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model("qwen2", layers=4)


@pytest.fixture(scope="module")
def target(hf):
    return TargetModel(hf)


def test_extracted_aux_features_are_the_targets_layer_inputs(target, tmp_path):
    """extract_shards with aux layers stores what one forward computes (bf16), the answer's top-8 where scored."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 4000, (20,), generator=gen).tolist()
    paths = train_data.extract_shards(target, [("a#greedy", ids, [0] * 8 + [1] * 12)], tmp_path, aux_layers=AUX,
                                      log=lambda *_: None)
    (seq,) = train_data.load_sequences(paths)
    out = target.forward(torch.tensor(ids), target.new_cache(20), aux_layers=AUX)
    torch.testing.assert_close(seq["aux"].float(), out.aux, atol=0.05, rtol=0.02)
    greedy = target.logits(out.hidden).argmax(-1)
    assert torch.equal(seq["topk_ids"][8:, 0], greedy[8:]) and seq["topk_ids"][:7, 0].tolist() == ids[1:8]
    (lazy,) = train_data.load_sequences(paths, lazy=True)  # the view reads the same rows from disk
    assert lazy["key"] == "a#greedy" and "aux" in lazy and torch.equal(lazy.load()["aux"], seq["aux"])


def test_code_prompts_cut_functions_from_the_standard_library():
    prompts = code_prompts(3)
    assert len(prompts) == 3 and all(key.startswith("stdlib:") and "def " in text for key, text in prompts)


def sequences_for(target, tmp_path, count=6):
    """Greedy continuations of random prompts (the target's own answers), with their aux-layer features."""
    gen = torch.Generator().manual_seed(1)
    items = []
    for n, length in enumerate((8, 10, 12) * (count // 3)):
        prompt = torch.randint(3, 4000, (length,), generator=gen).tolist()
        ids = prompt[:]
        for _ in range(24):
            out = target.forward(torch.tensor(ids), target.new_cache(len(ids)))
            ids.append(int(target.logits(out.hidden[-1:]).argmax()))
        items.append((f"s{n}", ids, [0] * length + [1] * 24))
    paths = train_data.extract_shards(target, items, tmp_path / "features", aux_layers=AUX, log=lambda *_: None)
    return train_data.load_sequences(paths)


@pytest.mark.parametrize("levels", [1, 2])
def test_a_few_eagle3_steps_lower_the_loss(target, hf, tmp_path, levels):
    head = make_head("eagle3", target, None, seed=0)
    seqs = sequences_for(target, tmp_path)
    train(head, seqs, target.lm_head_weight, tmp_path, steps=30, tokens_per_step=64, lr=3e-3, warmup=3,
          negatives=64, checkpoint_every=100, levels=levels, feature_weight=0.1, cls_weight=1.0)
    curve = [float(r["loss"]) for r in csv.DictReader((tmp_path / "loss.csv").open())]
    assert len(curve) == 30 and sum(curve[-5:]) / 5 < 0.7 * sum(curve[:3]) / 3


def test_bf16_autocast_steps_lower_the_loss_on_float32_master_weights(target, tmp_path, monkeypatch):
    """compute_dtype=bf16: the matmuls run in bf16 (seen inside the loss), the weights and their updates stay
    float32, and the loss falls as in float32."""
    import nanospec_core.training.trainer as trainer

    seen = []
    real = trainer.sequence_loss

    def watched(head, *args, **kwargs):
        seen.append(head.fc(torch.zeros(1, head.fc.in_features)).dtype)
        return real(head, *args, **kwargs)

    monkeypatch.setattr(trainer, "sequence_loss", watched)
    head = make_head("eagle3", target, None, seed=0)
    train(head, sequences_for(target, tmp_path), target.lm_head_weight, tmp_path, steps=30, tokens_per_step=64,
          lr=3e-3, warmup=3, negatives=64, checkpoint_every=100, levels=2, feature_weight=0.1, cls_weight=1.0,
          compute_dtype=torch.bfloat16)
    curve = [float(r["loss"]) for r in csv.DictReader((tmp_path / "loss.csv").open())]
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert len(curve) == 30 and sum(curve[-5:]) / 5 < 0.7 * sum(curve[:3]) / 3


def test_tied_head_trains_its_layer_not_the_targets_lm_head(target):
    head = make_head("eagle3", target, None, seed=0)
    assert head.lm_head is None and head.lm_head_weight is target.lm_head_weight
    assert not any(p is target.lm_head_weight for p in head.parameters())
    assert "lm_head.weight" not in head.state_dict()
    with pytest.raises(ValueError, match="aux-layer features"):
        input_features(head, {"hidden": torch.zeros(3, 64)})


def test_shipped_and_public_layouts_load_to_the_same_drafts(target, tmp_path):
    """save_head (tied: no lm head stored) and export_checkpoint (the lm head written out, vLLM / SGLang names)
    both load through load_head and draft the same logits."""
    head = random_head(target, "eagle3", seed=4, tied_lm_head=True)
    save_head(head, tmp_path / "tied")
    export_checkpoint(head, tmp_path / "public")
    from safetensors.torch import load_file

    tied_names = set(load_file(str(tmp_path / "tied" / "model.safetensors")))
    public = load_file(str(tmp_path / "public" / "model.safetensors"))
    assert "lm_head.weight" not in tied_names and public["lm_head.weight"].shape == (target.vocab_size, 64)
    assert "d2t" not in public and {"fc.weight", "norm.weight", "midlayer.hidden_norm.weight"} <= set(public)
    config = json.loads((tmp_path / "public" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["eagle_aux_hidden_state_layer_ids"] == list(head.aux_layers)
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [i - 1 for i in head.aux_layers]
    ids = torch.tensor([5, 9, 11, 40])
    features = target.forward(ids, target.new_cache(8), aux_layers=head.aux_layers).aux
    logits = []
    for folder in ("tied", "public"):
        loaded = load_head(str(tmp_path / folder), target)
        assert loaded.tied_lm_head == (folder == "tied")
        hidden = loaded.forward(ids, features, loaded.new_cache(8))
        logits.append(loaded.lm_input(hidden) @ loaded.lm_head_weight.T.to(hidden.dtype))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-2, rtol=1e-2)


def test_stages_continue_from_the_warm_start_head_and_reach_the_card(tmp_path):
    """One row per stage, continued from the warm start; the card keeps the earlier stages' prose sections and lists
    this stage's sources and held-out list."""
    from nanospec_core.training.card import stage_rows, write_card

    info = {"model": "m", "kind": "eagle3", "train_sequences": 10, "train_scored_tokens": 900, "tokens_seen": 1800,
            "train_wall_s": 120, "machine": "cpu", "corpus": "data/head/m", "heldout_list": "heldout.json (3 items)",
            "data": {"chat": {"items": 6, "answer_tokens": 600}, "code": {"items": 4, "answer_tokens": 300}}}
    metrics = {"top1": 0.5, "top1_level2_given_prev": 0.4, "expected_chain": 0.9, "positions": 50}
    first = stage_rows(tmp_path / "a", None, info, metrics)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stages.json").write_text(json.dumps(first))
    second = stage_rows(tmp_path / "b", str(tmp_path / "a"), info, {**metrics, "top1": 0.6})
    assert [r["stage"] for r in second] == [1, 2] and second[1]["heldout_top1"] == 0.6
    assert second[1]["chat_items"] == 6 and second[1]["code_items"] == 4
    assert stage_rows(tmp_path / "a", None, info, metrics)[-1]["stage"] == 1  # a random start: a new history
    (tmp_path / "b").mkdir()
    previous = "# old card\n\n## Stages (one row...)\n\n| x |\n\n## Stage 1 (2026-12-02)\n\n- stage one prose\n\nRerun:\n\nold"
    write_card(tmp_path / "b", {**info, "stages": second, "command": "x",
                                "heldout": {"bfloat16": {"all": metrics}}}, previous=previous)
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert "# EAGLE-3 draft head for m" in card and card.count("| random |") == 1 and "| 0.6 |" in card
    assert "## Stage 2 (" in card and "- stage one prose" in card and "old card" not in card
    assert card.index("## Stage 2 (") < card.index("## Stage 1 (")
    assert "chat 6 items / 600 answer tokens" in card and "heldout.json (3 items)" in card
    assert "| this head | bfloat16 | all | 50 | 0.500 |" in card

"""EAGLE-3 training on a tiny random Qwen2 target: features captured during generation, a few steps lower the
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
from nanospec_core.training.generate import code_prompts, generate_batch, held_out, rows_to_shard
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


@pytest.fixture(scope="module")
def rows(hf):
    """Two prompts of different lengths (so one is left-padded), 12 greedy new tokens each, no stop id."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 4000, (n,), generator=gen).tolist() for n in (9, 14)]
    return prompts, generate_batch(hf, prompts, AUX, max_new_tokens=12, temperature=0.0, pad_id=0, stop_ids={-1})


def test_generation_keeps_the_features_the_target_computes(target, rows):
    """Captured during batched, left-padded generation == one full forward over prompt + answer (float32)."""
    prompts, found = rows
    assert [row["b"] for row in found] == [0, 1]
    for prompt, row in zip(prompts, found):
        P, T = len(prompt), row["ids"].shape[0]
        assert T == P + 11 and row["ids"][:P].tolist() == prompt  # the last answer token has no features
        assert row["loss_mask"].tolist() == [0] * P + [1] * 11
        out = target.forward(row["ids"].long(), target.new_cache(T), aux_layers=AUX)
        torch.testing.assert_close(row["aux"].float(), out.aux, atol=0.05, rtol=0.02)  # stored in bf16
        torch.testing.assert_close(row["hidden"].float(), out.hidden, atol=0.05, rtol=0.02)
        greedy = target.logits(out.hidden).argmax(-1)
        assert torch.equal(row["topk_ids"][P - 1:, 0].long(), greedy[P - 1:])  # distributions from the answer on
        assert torch.equal(row["ids"][P:].long(), greedy[P - 1:-1])  # greedy: each answer token is the argmax
        assert row["topk_ids"][:P - 1, 0].tolist() == prompt[1:]  # prompt rows: the next prompt token


def test_shards_round_trip_with_keys(rows, tmp_path):
    _, found = rows
    train_data.write_shard(tmp_path, {}, ["a#greedy", "b#greedy"], rows_to_shard(found))
    seqs = train_data.load_sequences([tmp_path / "shard_00000.safetensors"])
    assert [s["key"] for s in seqs] == ["a#greedy", "b#greedy"]
    assert torch.equal(seqs[1]["aux"], found[1]["aux"]) and seqs[1]["loss_mask"].dtype == torch.bool


def test_held_out_split_is_fixed_by_key():
    keys = [f"sharegpt:{i}#greedy" for i in range(2000)]
    share = sum(map(held_out, keys)) / len(keys)
    assert 0.07 < share < 0.13
    assert [held_out(k) for k in keys[:50]] == [held_out(k) for k in keys[:50]]


def test_code_prompts_cut_functions_from_the_standard_library():
    prompts = code_prompts(3)
    assert len(prompts) == 3 and all(key.startswith("stdlib:") and "def " in text for key, text in prompts)


def sequences_for(target, hf, count=6):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 4000, (n,), generator=gen).tolist() for n in (8, 10, 12) * (count // 3)]
    rows = generate_batch(hf, prompts, AUX, max_new_tokens=24, temperature=0.0, pad_id=0, stop_ids={-1})
    for row in rows:
        row.update(ids=row["ids"].long(), loss_mask=row["loss_mask"].bool(), topk_ids=row["topk_ids"].long(),
                   topk_probs=row["topk_probs"].float())
    return rows


@pytest.mark.parametrize("levels", [1, 2])
def test_a_few_eagle3_steps_lower_the_loss(target, hf, tmp_path, levels):
    head = make_head("eagle3", target, None, seed=0)
    seqs = sequences_for(target, hf)
    train(head, seqs, target.lm_head_weight, tmp_path, steps=30, tokens_per_step=64, lr=3e-3, warmup=3,
          negatives=64, checkpoint_every=100, levels=levels, feature_weight=0.1, cls_weight=1.0)
    curve = [float(r["loss"]) for r in csv.DictReader((tmp_path / "loss.csv").open())]
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
    from nanospec_core.training.card import stage_rows, write_card

    info = {"model": "m", "kind": "eagle3", "sequences": 10, "generated_chat": 4, "generated_code": 2,
            "sharegpt_text": 4, "train_scored_tokens": 900, "tokens_seen": 1800, "train_wall_s": 120, "machine": "cpu"}
    metrics = {"top1": 0.5, "top1_level2_given_prev": 0.4, "expected_chain": 0.9}
    first = stage_rows(tmp_path / "a", None, info, metrics)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stages.json").write_text(json.dumps(first))
    second = stage_rows(tmp_path / "b", str(tmp_path / "a"), info, {**metrics, "top1": 0.6})
    assert [r["stage"] for r in second] == [1, 2] and second[1]["heldout_top1"] == 0.6
    assert stage_rows(tmp_path / "a", None, info, metrics)[-1]["stage"] == 1  # a random start: a new history
    (tmp_path / "b").mkdir()
    write_card(tmp_path / "b", {**info, "stages": second, "command": "x"})
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert "# EAGLE-3 draft head for m" in card and card.count("| random |") == 1 and "| 0.6 |" in card


def test_answers_from_a_serving_engine_align_like_the_captured_ones(tmp_path):
    """training/answers: a vLLM answer becomes (prompt + answer without its stop id, loss on answer positions),
    the alignment training/generate.py uses when it captures features itself; torn lines and 1-token answers drop."""
    from nanospec_core.training.answers import answer_items

    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"key": "sharegpt:a#greedy", "prompt_ids": [1, 2, 3], "answer_ids": [7, 8, 9, 2]})
                    + "\n" + json.dumps({"key": "sharegpt:b#t0.7", "prompt_ids": [1], "answer_ids": [2]}) + "\n"
                    + '{"key": "torn", "prompt')
    assert answer_items(path) == [("sharegpt:a#greedy", [1, 2, 3, 7, 8, 9], [0, 0, 0, 1, 1, 1])]


def test_prompts_for_a_new_stage_avoid_every_prompt_stage_one_could_have_trained_on(tmp_path):
    """A warm-started head is never scored (held out) or trained again on a stage-1 prompt: new prompts come from
    outside stage 1's whole candidate pools; even ones greedy, odd ones sampled (the tag is part of the key)."""
    from tests.conftest import tiny_tokenizer
    from nanospec_core.training.answers import read_jsonl, stage1_keys, write_prompts

    path = tmp_path / "prompts.jsonl"
    count = write_prompts(tiny_tokenizer(), path, sharegpt=6, code=4, seed=2, max_prompt_tokens=10 ** 6)
    records = read_jsonl(path)
    assert count == len(records) == 10
    keys = {r["key"].split("#")[0] for r in records}
    assert not keys & stage1_keys()
    assert sum(k.startswith("sharegpt:") for k in keys) == 6
    assert [r["temperature"] for r in records[:2]] == [0.0, 0.7] and records[1]["key"].endswith("#t0.7")

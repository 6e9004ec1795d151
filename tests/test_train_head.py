"""EAGLE head training on a tiny random Qwen2 target: data shards, loss falls, checkpoint resume, export + load."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from nanospec_core.training import data as train_data
from nanospec_core.models.eagle import random_head
from nanospec_core.models.eagle_checkpoint import load_head
from nanospec_core.models.target import TargetModel
from nanospec_core.training.trainer import export, load_checkpoint, train
from nanospec_core.training.loss import evaluate, level_mask, unrolled

from .conftest import tiny_hf_model


@pytest.fixture(scope="module")
def target():
    return TargetModel(tiny_hf_model("qwen2"))


@pytest.fixture(scope="module")
def sequences(target, tmp_path_factory):
    """Six raw id sequences (answer mask on the second half) -> shards of 4 -> sequence dicts."""
    gen = torch.Generator().manual_seed(0)
    raw = []
    for i, n in enumerate((40, 48, 56, 40, 64, 48)):
        ids = torch.randint(3, target.vocab_size, (n,), generator=gen).tolist()
        raw.append((f"conv{i}", ids, [0] * (n // 2) + [1] * (n - n // 2)))
    folder = tmp_path_factory.mktemp("shards")
    paths = train_data.extract_shards(target, raw, folder, shard_size=4, topk=8, log=lambda *_: None)
    assert [p.name for p in paths] == ["shard_00000.safetensors", "shard_00001.safetensors"]
    # Resumable: a second call finds both shards and recomputes nothing.
    again = train_data.extract_shards(target, raw, folder, shard_size=4, topk=8, deadline=0.0, log=lambda *_: None)
    assert again == paths
    return train_data.load_sequences(paths)


def test_extraction_extends_by_key(target, tmp_path):
    """More (and reordered) items later: only the new keys are extracted, into a shard after the old ones."""
    gen = torch.Generator().manual_seed(1)
    raw = [(f"c{i}", torch.randint(3, target.vocab_size, (20,), generator=gen).tolist(), [1] * 20) for i in range(5)]
    first = train_data.extract_shards(target, raw[:3], tmp_path, shard_size=2, log=lambda *_: None)
    assert len(first) == 2
    paths = train_data.extract_shards(target, raw[::-1], tmp_path, shard_size=2, log=lambda *_: None)
    assert paths[:2] == first and len(paths) == 3
    index = json.loads((tmp_path / "index.json").read_text())
    assert index[paths[2].name] == ["c4", "c3"]
    loaded = train_data.load_sequences(paths)
    assert [s["ids"].tolist() for s in loaded] == [raw[i][1] for i in (0, 1, 2, 4, 3)]


def test_shards_hold_target_features_and_top_ids(target, sequences):
    """At scored positions (loss mask 1) the target's own top-8; at the others the text's next token (prob 1)."""
    seq = sequences[0]
    assert seq["hidden"].shape == (40, 64) and seq["topk_ids"].shape == (40, 8)
    out = target.forward(seq["ids"], target.new_cache(40))
    assert torch.allclose(seq["hidden"].float(), out.hidden, atol=0.05, rtol=0.02)
    scored = seq["loss_mask"]
    assert torch.equal(seq["topk_ids"][scored, 0], target.logits(out.hidden[scored]).argmax(-1))
    expected = target.logits(out.hidden[scored]).softmax(-1).topk(8, dim=-1).values  # the target's own top-8
    torch.testing.assert_close(seq["topk_probs"][scored].float(), expected, atol=2e-3, rtol=2e-3)  # float16
    assert bool((seq["topk_probs"].float().sum(-1) <= 1.0 + 1e-3).all())
    prompt = ~scored
    assert torch.equal(seq["topk_ids"][prompt, 0][:-1], seq["ids"][1:][prompt[:-1]][: int(prompt.sum()) - 1])
    assert bool((seq["topk_probs"][prompt, 0] == 1).all())


def losses(work):
    return [float(row["loss"]) for row in csv.DictReader((work / "loss.csv").open())]


@pytest.mark.parametrize("levels", [1, 2])
def test_a_few_steps_make_the_loss_fall(target, sequences, tmp_path, levels):
    head = random_head(target, seed=0).float()
    train(head, sequences, target.lm_head_weight, tmp_path, steps=30, tokens_per_step=64, lr=3e-3, warmup=3,
          negatives=64, checkpoint_every=100, levels=levels)
    curve = losses(tmp_path)
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < 0.7 * sum(curve[:3]) / 3


def test_unrolled_levels_equal_drafting_one_chain_at_a_time(target, sequences):
    """Level r of `unrolled` (one batched pass per level, level_mask) == the head drafting a chain token by token
    from a true-feature prefix, as the engine does; so training sees exactly the inference visibility."""
    head = random_head(target, seed=3).float()
    seq = sequences[2]
    ids, features = seq["ids"], seq["hidden"][:-1].float()
    with torch.no_grad():
        preds = unrolled(head, ids, features, levels=3)
        assert [p.shape[0] for p in preds] == [ids.shape[0] - r for r in (1, 2, 3)]
        for j in (0, 7, 20, ids.shape[0] - 4):
            cache = head.new_cache(128)
            chain = [head.forward(ids[1:j + 2], features[:j + 1], cache)[-1:]]  # verified prefix: index 0..j
            for level in (2, 3):
                chain.append(head.forward(ids[j + level:j + level + 1], chain[-1], cache))
            for level, step in enumerate(chain):
                assert torch.allclose(preds[level][j], step[0], atol=1e-5), (j, level)


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_unrolling_only_some_chains_equals_the_full_pass(target, sequences, kind):
    """Chains from an index on, with gaps: the rows before the first are context (keys and values only), deeper
    levels unroll only the chains asked for; every prediction equals the full pass's row of that chain."""
    head = random_head(target, kind, seed=4).float()
    seq = sequences[4]
    ids, T = seq["ids"], seq["ids"].shape[0]
    width = 3 * target.hidden_size if kind == "eagle3" else target.hidden_size
    features = torch.randn(T - 1, width, generator=torch.Generator().manual_seed(1))
    chains = torch.tensor([20, 21, 25, 26, 27, 40, T - 4, T - 3, T - 2])
    with torch.no_grad():
        full = unrolled(head, ids, features, levels=3)
        some = unrolled(head, ids, features, levels=3, chains=chains)
    assert [p.shape[0] for p in some] == [9, 8, 7]  # chain j reaches level r when j < T - r
    for level, (part, whole) in enumerate(zip(some, full), start=1):
        assert torch.allclose(part, whole[chains[:part.shape[0]]], atol=1e-5), level


def test_the_loss_on_answer_chains_equals_the_loss_of_the_full_pass(target, sequences, monkeypatch):
    """sequence_loss unrolls only the chains with a loss somewhere; loss and gradients equal those of unrolling
    every chain."""
    from nanospec_core.training import loss as loss_module

    seq = sequences[4]
    head = random_head(target, seed=5).float()

    def loss_and_grads():
        head.zero_grad()
        value, stats = loss_module.sequence_loss(head, seq, target.lm_head_weight, 64, 0.0,
                                                 torch.Generator().manual_seed(0), levels=3)
        value.backward()
        return value.detach(), stats, [p.grad.clone() for p in head.parameters() if p.grad is not None]

    fast = loss_and_grads()
    monkeypatch.setattr(loss_module, "scored_chains", lambda mask, levels: torch.arange(mask.shape[0] - 1))
    slow = loss_and_grads()
    assert torch.allclose(fast[0], slow[0], atol=1e-6) and fast[1] == slow[1]
    assert len(fast[2]) == len(slow[2]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fast[2], slow[2]))


def test_level_mask_is_causal_prefix_plus_own_chain():
    mask = level_mask(5, 3)  # level 1 wrote 4 entries, level 2 wrote 3, level 3 has 2 rows
    assert mask.shape == (2, 4 + 3 + 2)
    assert mask[0].tolist() == [1, 0, 0, 0] + [1, 0, 0] + [1, 0]
    assert mask[1].tolist() == [1, 1, 0, 0] + [0, 1, 0] + [0, 1]
    chains = level_mask(6, 3, torch.tensor([1, 2, 4]))  # chain 4 reaches neither level 2 nor 3 (j < 6 - r)
    assert chains.int().tolist() == [[1, 1, 0, 0, 0] + [1, 0] + [1, 0],
                                     [1, 1, 1, 0, 0] + [0, 1] + [0, 1]]


def test_resume_continues_from_the_checkpointed_step(target, sequences, tmp_path):
    head = random_head(target, seed=0).float()
    state = train(head, sequences, target.lm_head_weight, tmp_path, steps=3, tokens_per_step=64, negatives=64,
                  checkpoint_every=1)
    assert state["step"] == 3
    fresh = random_head(target, seed=1).float()
    optimizer = torch.optim.AdamW(fresh.parameters())
    assert load_checkpoint(tmp_path / "checkpoint.pt", fresh, optimizer)["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), fresh.state_dict().values()))
    resumed = random_head(target, seed=2).float()
    state = train(resumed, sequences, target.lm_head_weight, tmp_path, steps=5, tokens_per_step=64, negatives=64,
                  checkpoint_every=1)
    assert state["step"] == 5
    assert [int(row["step"]) for row in csv.DictReader((tmp_path / "loss.csv").open())] == [1, 2, 3, 4, 5]


def test_exported_head_loads_and_drafts_finite_hidden_states(target, sequences, tmp_path):
    head = random_head(target, seed=0).float()
    train(head, sequences, target.lm_head_weight, tmp_path / "work", steps=2, tokens_per_step=64, negatives=64)
    export(head, tmp_path / "head", {"training": {"steps": 2}})
    loaded = load_head(str(tmp_path / "head"), target)
    seq = sequences[1]
    hidden = loaded.forward(seq["ids"][1:], seq["hidden"][:-1], loaded.new_cache(64))
    assert hidden.shape == (47, 64) and torch.isfinite(hidden).all()
    metrics = evaluate(loaded, sequences, target.lm_head_weight)
    assert 0.0 <= metrics["top1"] <= 1.0 and metrics["positions"] > 0
    assert 0.0 <= metrics["top1_level3_given_prev"] <= 1.0
    assert metrics["expected_chain"] <= 3 * metrics["top1"] + 1e-9


def test_held_out_counts_equal_scoring_every_chain_of_the_full_pass(target, sequences):
    """evaluate (only the scored chains unrolled) counts the same hits per level as the full pass scored chain by
    chain. The text is the head's own level-1 greedy text, so chains live past level 1 and deeper levels score."""
    head = random_head(target, seed=7).float()
    seq = dict(sequences[5])
    features, T = seq["hidden"], seq["ids"].shape[0]
    ids, top1 = seq["ids"].clone(), seq["topk_ids"].clone()
    with torch.no_grad():
        coin = torch.rand(T, 2, generator=torch.Generator().manual_seed(3))
        for t in range(T // 2, T - 1):  # the answer: the target's token mostly the head's, the text mostly the target's
            guess = (head.forward(ids[1:t + 1], features[:t], head.new_cache(64))[-1] @ target.lm_head_weight.T)
            top1[t, 0] = guess.argmax() + (coin[t, 0] > 0.8)
            ids[t + 1] = top1[t, 0] + (coin[t, 1] > 0.8)
        seq.update(ids=ids, topk_ids=top1)
        metrics = evaluate(head, [seq], target.lm_head_weight, levels=3)
        hits, totals = [0, 0, 0], [0, 0, 0]
        preds = unrolled(head, ids, features[:-1], levels=3)
        for j in range(T - 1):
            for level in (1, 2, 3):
                follows = level == 1 or ids[j + level] == top1[j + level - 1, 0]
                if not seq["loss_mask"][j + 1] or j + level >= T or not follows:
                    break
                totals[level - 1] += 1
                if (preds[level - 1][j] @ target.lm_head_weight.T).argmax() != top1[j + level, 0]:
                    break
                hits[level - 1] += 1
    assert metrics["hits"] == hits and metrics["totals"] == totals, (metrics, hits, totals)
    assert hits[0] > 0 and totals[1] > 0, "the text must let chains reach level 2"


def test_calibration_ranks_equal_drafting_each_chain_one_token_at_a_time(target, monkeypatch):
    """calibrate.head_ranks (chains from the answer on, unrolled together) == each chain drafted alone (ranks
    uncapped: a random head's would all sit at the cap)."""
    from nanospec_core.training import calibrate

    monkeypatch.setattr(calibrate, "RANK_CAP", 10 ** 6)
    head = random_head(target, seed=6).float()
    ids = torch.randint(3, target.vocab_size, (12,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for _ in range(16):  # the target's greedy answer: every chain follows the target's tokens
            out = target.forward(ids, target.new_cache(64))
            ids = torch.cat([ids, target.logits(out.hidden[-1:]).argmax(-1)])
        ranks = calibrate.head_ranks(target, head, ids, answer_start=12, depth=3)
        out = target.forward(ids, target.new_cache(64))
        greedy, features, weight = target.logits(out.hidden).argmax(-1), out.hidden, head.lm_head_weight
        assert ranks.shape == (ids.shape[0] - 3 - 1 - 12, 3)
        for row, j in enumerate(range(12, ids.shape[0] - 4)):
            cache = head.new_cache(64)
            pred = head.forward(ids[1:j + 2], features[:j + 1], cache)[-1:]
            for level in (1, 2, 3):
                if level > 1:
                    pred = head.forward(ids[j + level:j + level + 1], pred, cache)
                logits = head.lm_input(pred)[0] @ weight.T
                assert ranks[row, level - 1] == int((logits > logits[greedy[j + level]]).sum()), (j, level)

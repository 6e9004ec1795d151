"""One head-training stage end to end on a tiny model: committed answers -> features -> training -> the held-out
comparison with the warm start -> shipped (or kept back) with its card and stage row."""
from __future__ import annotations

import json

import torch

from nanospec_core.__main__ import main
from nanospec_core.models.eagle import random_head
from nanospec_core.models.eagle_checkpoint import save_head
from nanospec_core.models.target import TargetModel
from nanospec_core.training import corpus
from nanospec_core.training.split import HeldOut, norm_hash
from nanospec_core.training.stage import beats, held_out_items


@torch.no_grad()
def greedy(target, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(target.logits(target.forward(torch.tensor(ids), target.new_cache(len(ids))).hidden[-1:]).argmax()))
    return ids[len(prompt):]


def make_corpus(folder, target, train=10, held=4):
    """The tiny target's own greedy answers to random prompts, committed like vLLM's, with a held-out list."""
    gen = torch.Generator().manual_seed(0)
    records = []
    for n in range(train + held):
        split = "heldout" if n >= train else "train"
        kind = ("chat", "code", "long", "turn")[n % 4]
        prompt = torch.randint(3, 500, (6 + n % 5,), generator=gen).tolist()
        meta = {"key": f"k{n}", "source": "sharegpt", "kind": kind, "turn": 0, "record": f"{n}:k{n}",
                "base": f"sharegpt:k{n}", "norm": norm_hash(f"prompt {n}"), "split": split, "sampler": "greedy"}
        records.append({"key": f"k{n}", "prompt_ids": prompt, "answer_ids": greedy(target, prompt, 24), "meta": meta})
    corpus.write_shard(folder, records, "test", "float32", set())
    HeldOut([r["meta"] for r in records if r["meta"]["split"] == "heldout"]).save(folder / "heldout.json", "test")
    return records


def test_a_stage_trains_on_the_corpus_and_ships_only_when_it_beats_the_warm_start(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    target = TargetModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    make_corpus(tmp_path / "corpus", target)
    init = tmp_path / "init"
    save_head(random_head(target, "eagle3", seed=1, tied_lm_head=True), init)
    (init / "MODEL_CARD.md").write_text("# old\n\n## Stage 1 (earlier)\n\n- Sources and the records this stage may "
                                        "have seen: ShareGPT records before 8,000\n")
    (init / "stages.json").write_text(json.dumps([{"stage": 1, "heldout_top1": 0.0}]))
    args = ["train-head", "--model", tiny_model_dir, "--device", "cpu", "--target-dtype", "float32",
            "--corpus", str(tmp_path / "corpus"), "--init", str(init), "--out", str(tmp_path / "out"),
            "--work", str(tmp_path / "work"), "--steps", "40", "--tokens-per-step", "64", "--lr", "3e-3",
            "--warmup", "3", "--negatives", "32", "--checkpoint-every", "100"]
    assert main(args) == 0
    result = json.loads((tmp_path / "work" / "result.json").read_text())
    mine, before = result["heldout"]["float32"]["all"], result["heldout_init"]["float32"]["all"]
    assert result["train_sequences"] == 10 and mine["positions"] == before["positions"] > 0
    assert set(result["heldout"]["float32"]) >= {"all", "chat", "code"}
    shipped = beats(mine, before)
    folder = tmp_path / ("out" if shipped else "work/head")
    assert (folder / "config.json").is_file() and (tmp_path / "out" / "config.json").is_file() == shipped
    card = (folder / "MODEL_CARD.md").read_text()
    assert "## Stage 2 (" in card and "## Stage 1 (earlier)" in card  # the earlier stage's prose carried over
    assert json.loads((folder / "stages.json").read_text())[-1]["stage"] == 2
    # score-only: the same positions for any head; the stage's own figures are those of the head as shipped
    capsys.readouterr()
    assert main(["train-head", *args[1:], "--eval-head", str(init), str(folder), "--score-dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    scores = json.loads(out[out.index("\n{\n") + 1:])  # after the progress log lines
    assert scores[str(init)] == result["heldout_init"] and scores[str(folder)] == result["heldout"]


def test_held_out_items_are_cut_after_their_first_answer_tokens(tmp_path):
    folder = tmp_path / "c"
    rows = [{"key": "h", "prompt_ids": [1, 2], "answer_ids": list(range(10, 40)),
             "meta": {"key": "h", "base": "b", "norm": "n", "split": "heldout", "kind": "chat"}},
            {"key": "t", "prompt_ids": [1], "answer_ids": [5, 6, 7],
             "meta": {"key": "t", "base": "c", "norm": "m", "split": "train", "kind": "chat"}}]
    corpus.write_shard(folder, rows, "e", "float32", set())
    held = HeldOut([rows[0]["meta"]])
    ((key, ids, mask),) = held_out_items(corpus.read_corpus(folder), held, answer_tokens=8)
    assert key == "h" and ids == [1, 2] + list(range(10, 18)) and mask == [0, 0] + [1] * 8

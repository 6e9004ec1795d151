"""The committed head-training corpus: compact shards that round-trip, a held-out rule that relatives cannot cross,
prompts that carry their provenance, and the committed data itself obeying the rule (an oracle outside the trainer)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nanospec_core.paths import head_data
from nanospec_core.training import corpus
from nanospec_core.training.split import HeldOut, base_of, norm_hash, normalise, prompt_sha
from nanospec_core.vocab.frequency import SHAREGPT_EVAL_FROM

EMBEDDED = head_data("qwen2.5-coder-0.5b-instruct")


def record(key, prompt, answer, split="train", base=None, norm=None, kind="chat"):
    meta = {"key": key, "source": "sharegpt", "kind": kind, "turn": 0, "record": f"1:{key}",
            "base": base or f"sharegpt:{key}", "norm": norm or norm_hash(key), "split": split, "sampler": "greedy"}
    return {"key": key, "prompt_ids": prompt, "answer_ids": answer, "meta": meta}


def test_shards_round_trip_with_their_manifest_and_skip_what_is_committed(tmp_path):
    answers = tmp_path / "answers.jsonl"
    rows = [record("a", [1, 2, 3], [150000, 9, 151645]), record("b", [4], [5, 6])]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"key": "torn", "pro')
    path, count = corpus.pack_answers(answers, tmp_path / "c", "vllm x", "bfloat16", {151645})
    assert count == 2 and path.name == "answers_00000.jsonl"
    items = corpus.read_corpus(tmp_path / "c")
    assert [(i["prompt_ids"], i["answer_ids"]) for i in items] == [([1, 2, 3], [150000, 9, 151645]), ([4], [5, 6])]
    meta = items[0]["meta"]
    assert meta["finished"] and not items[1]["meta"]["finished"] and meta["engine"] == "vllm x"
    assert meta["prompt_sha"] == prompt_sha([1, 2, 3]) and meta["answer_tokens"] == 3
    # a second pack finds nothing new; a new answer makes the next shard
    assert corpus.pack_answers(answers, tmp_path / "c", "vllm x", "bfloat16", {151645}) == (None, 0)
    with answers.open("a") as sink:
        sink.write("\n" + json.dumps(record("c", [7], [8, 9])) + "\n")
    path, count = corpus.pack_answers(answers, tmp_path / "c", "vllm x", "bfloat16", {151645})
    assert count == 1 and path.name == "answers_00001.jsonl" and len(corpus.read_corpus(tmp_path / "c")) == 3


def test_a_shard_whose_ids_do_not_match_its_manifest_is_refused(tmp_path):
    corpus.write_shard(tmp_path, [record("a", [1, 2], [3, 4])], "e", "bfloat16", set())
    npz = tmp_path / "shards" / "answers_00000.npz"
    arrays = dict(np.load(npz))
    arrays["tokens"][0] = 99
    np.savez_compressed(npz, **arrays)
    with pytest.raises(Exception, match="prompt hash"):
        corpus.read_corpus(tmp_path)


def test_shards_are_compact(tmp_path):
    rng = np.random.default_rng(0)
    rows = [record(f"k{i}", rng.integers(0, 151936, 200).tolist(), rng.integers(0, 30000, 300).tolist())
            for i in range(20)]
    corpus.write_shard(tmp_path, rows, "e", "bfloat16", set())
    size = (tmp_path / "shards" / "answers_00000.npz").stat().st_size
    assert size < 4 * 20 * 500  # under 4 bytes a token even for random ids (real text compresses to ~2)


def test_relatives_share_a_base_and_trivial_prompts_a_norm():
    assert base_of("sharegpt", "QWJhYvA_0") == base_of("sharegpt", "QWJhYvA_11") == "sharegpt:QWJhYvA"
    assert base_of("code", "site/pkg/mod.py:f") == base_of("code", "site/pkg/mod.py:g") == "code:site/pkg/mod.py"
    assert base_of("doc", "Jinja2:METADATA:0") == base_of("doc", "jinja2:METADATA:1")
    assert normalise("  Hi!! ") == normalise("hi") and norm_hash("Test.") == norm_hash("test")
    assert normalise("Café") == "cafe" and normalise("你好，世界") == "你好 世界"


def test_the_held_out_rule_excludes_relatives_and_duplicates():
    held = HeldOut([{"key": "sharegpt:A_0:t0#greedy", "base": "sharegpt:A", "norm": norm_hash("hi"), "kind": "chat"}])
    same_base = {"key": "x", "base": "sharegpt:A", "norm": "n1"}
    same_text = {"key": "y", "base": "sharegpt:B", "norm": norm_hash("Hi!")}
    other = {"key": "z", "base": "sharegpt:C", "norm": norm_hash("hello there")}
    assert held.excludes(same_base) and held.excludes(same_text) and not held.excludes(other)
    items = corpus.training_items([{"meta": m, "prompt_ids": [1], "answer_ids": [2, 3, 4]}
                                   for m in (same_base, same_text, other)], held.excludes)
    assert items == [("z", [1, 2, 3], [0, 1, 1])]  # prompt + answer without its stop id, loss on the answer


def test_later_turns_carry_the_targets_own_earlier_answers():
    from nanospec_core.training.sources import turn_items
    from tests.conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    conversation = {"id": "Q_0", "conversations": [{"from": "human", "value": "first question"},
                                                   {"from": "gpt", "value": "human-written answer"},
                                                   {"from": "human", "value": "second question"},
                                                   {"from": "gpt", "value": "x"}]}
    meta = {"key": "sharegpt:Q_0:t0#greedy", "kind": "chat", "turn": 0, "record": "5:Q_0", "base": "sharegpt:Q",
            "norm": "n", "split": "train", "sampler": "greedy", "source": "sharegpt"}
    own = tok("the target's own reply", add_special_tokens=False)["input_ids"]
    answered = {meta["key"]: {"meta": meta, "prompt_ids": [1], "answer_ids": own}}
    (item,) = turn_items(tok, answered, {"Q_0": conversation})
    text = tok.decode(item["prompt_ids"])
    assert "the target's own reply" in text and "human-written answer" not in text and "second question" in text
    assert item["key"] == "sharegpt:Q_0:t1#greedy" and item["meta"]["turn"] == 1 and item["meta"]["kind"] == "turn"
    assert item["meta"]["base"] == "sharegpt:Q"  # a later turn stays on its conversation's side of the split
    answered[item["key"]] = {"meta": item["meta"], "prompt_ids": item["prompt_ids"], "answer_ids": own}
    assert turn_items(tok, answered, {"Q_0": conversation}) == []  # no third user turn


def test_long_tasks_wrap_a_passage_in_an_instruction():
    import random

    from nanospec_core.training.sources import long_task, passages_of

    text = "\n\n".join(f"Paragraph {i} " + "word " * 150 for i in range(20))
    windows = passages_of(text, 3000, 7000)
    assert windows and all(3000 <= len(w) <= 7000 for w in windows)
    tasks = {long_task(random.Random(seed), windows[0])[0] for seed in range(40)}
    assert tasks == {"summarize", "extract", "qa", "translate"}


def test_the_frequency_table_reads_no_evaluation_record():
    from safetensors import safe_open

    from nanospec_core.errors import NanoSpecError
    from nanospec_core.paths import frequency_table
    from nanospec_core.vocab.frequency import load_sharegpt

    with safe_open(str(frequency_table("qwen2.5-coder-0.5b-instruct")), "pt") as table:
        assert table.metadata()["records"] == f"0-{SHAREGPT_EVAL_FROM - 1}"
    with pytest.raises(NanoSpecError, match="evaluation-only"):
        next(load_sharegpt(SHAREGPT_EVAL_FROM + 1))


def check_split(manifest: list[dict], held: HeldOut) -> list[str]:
    """Every way a committed training item could touch the held-out list (an oracle apart from the trainer)."""
    problems = []
    held_files = {b for b in held.bases if b.startswith(("code:", "doc:"))}
    for meta in manifest:
        position = int(meta["record"].split(":", 1)[0]) if meta["source"] == "sharegpt" else None
        if meta["split"] == "heldout":
            if meta["key"] in held.retired_keys:  # taken off the list: neither scored nor trained on
                continue
            if meta["base"] not in held.bases:
                problems.append(f"{meta['key']}: held out but its base is not on the list")
            if position is not None and position < SHAREGPT_EVAL_FROM:
                problems.append(f"{meta['key']}: held-out ShareGPT item from the training range")
            continue
        if meta["base"] in held.bases or meta["base"] in held_files:
            problems.append(f"{meta['key']}: shares base {meta['base']} with the held-out list")
        if meta["norm"] in held.norms:
            problems.append(f"{meta['key']}: same normalised prompt as a held-out item")
        if position is not None and position >= SHAREGPT_EVAL_FROM:
            problems.append(f"{meta['key']}: ShareGPT record {position} is evaluation-only")
    return problems


def test_the_split_check_catches_a_leak():
    held = HeldOut([{"key": "h", "base": "sharegpt:A", "norm": "n0", "kind": "chat"}],
                   retired=[{"key": "r", "base": "code:x.py", "reason": "seen by an earlier stage"}])
    clean = {"key": "t", "source": "sharegpt", "record": "10:B_0", "base": "sharegpt:B", "norm": "n1",
             "split": "train"}
    assert check_split([clean], held) == []
    assert len(check_split([{**clean, "base": "sharegpt:A"}], held)) == 1
    assert len(check_split([{**clean, "norm": "n0"}], held)) == 1
    assert len(check_split([{**clean, "record": "9000:B_0"}], held)) == 1
    retired = {"key": "r", "source": "code", "record": "site/x.py:f", "base": "code:x.py", "norm": "n2",
               "split": "heldout"}
    assert check_split([retired], held) == [] and held.excludes(retired)  # off the list, and never trained on
    assert len(check_split([{**retired, "key": "q"}], held)) == 1  # held out, yet on no list


def test_the_committed_corpus_keeps_its_held_out_list_apart():
    """data/head/<embedded>: the list exists, the corpus holds answers, and no training item shares a base
    conversation, a file, a package or a normalised prompt with a held-out one, nor reads an evaluation record."""
    held = HeldOut.load(EMBEDDED / "heldout.json")
    assert len(held.items) >= 150 and {i["kind"] for i in held.items} >= {"chat", "code", "long"}
    assert all(i["base"].startswith("code:vllm/") for i in held.items if i["kind"] == "code")  # no stage drew there
    manifest = corpus.read_manifest(EMBEDDED)
    assert sum(m["split"] == "train" for m in manifest) > 0 and sum(m["split"] == "heldout" for m in manifest) > 0
    assert check_split(manifest, held) == []
    assert all(m["engine"] and m["dtype"] and m["sampler"] in ("greedy", "t0.7") for m in manifest
               if m["kind"] != "read")
    read = [m for m in manifest if m["kind"] == "read"]  # original text the target only reads: no sampler, no engine
    assert read and all(m["sampler"] == "original" and m["split"] == "train" and m["scored"] for m in read)


def test_transformers_answers_feed_the_same_packing(tmp_path):
    """head-answers (the GPU path): greedy answers equal the target's own greedy decoding, end at a stop id or the
    cap, and pack into a shard like vLLM's."""
    import torch

    from nanospec_core.models.target import TargetModel
    from nanospec_core.training.hf_answers import run
    from tests.conftest import tiny_hf_model, tiny_tokenizer

    hf, tok = tiny_hf_model("qwen2"), tiny_tokenizer()
    prompts = tmp_path / "prompts.jsonl"
    rows = [record(f"p{i}", [5 + i] * (3 + i), []) for i in range(3)]
    prompts.write_text("".join(json.dumps({**r, "temperature": 0.0}) + "\n" for r in rows))
    assert run(hf, tok, prompts, tmp_path / "answers.jsonl", {2}, batch_size=2, max_new_tokens=5,
               log=lambda *_: None) == 3
    target = TargetModel(hf)
    for answer in corpus.read_jsonl(tmp_path / "answers.jsonl"):
        ids = list(answer["prompt_ids"])
        for _ in range(len(answer["answer_ids"])):  # plain greedy decoding, one forward per token
            ids.append(int(target.logits(target.forward(torch.tensor(ids), target.new_cache(len(ids))).hidden[-1:]).argmax()))
        assert ids[len(answer["prompt_ids"]):] == answer["answer_ids"] and answer["engine"].startswith("transformers")
    _, count = corpus.pack_answers(tmp_path / "answers.jsonl", tmp_path / "c", "x", "float32", {2})
    assert count == 3 and len(corpus.read_corpus(tmp_path / "c")) == 3


def test_every_shipped_head_card_says_what_each_stage_may_have_seen():
    from nanospec_core.paths import ASSETS

    cards = sorted((ASSETS / "heads").glob("*/*/MODEL_CARD.md"))
    assert cards
    for card in cards:
        stages = card.read_text().split("\n## Stage ")[1:]
        stages = [s for s in stages if not s.startswith("s (")]  # the stages table's own heading
        assert stages and all("Sources and the records this stage may have seen" in s for s in stages), card
        assert all("8,000" in s for s in stages), card  # and where ShareGPT's evaluation range starts


def test_calibration_prompts_come_from_allowed_records_no_head_trained_on():
    """acceptance.json ships with the head: its prompts come from records below 8,000, and no record with the same
    first turn was trained on (found again here from the raw file, apart from calibrate's own filter)."""
    import re

    from nanospec_core.training.calibrate import TRAINING_DRAWS, calibration_prompts
    from nanospec_core.training.data import iter_sharegpt, sample_conversations, to_messages

    prompts = calibration_prompts(16, corpus=EMBEDDED)
    mixed = calibration_prompts(16, corpus=EMBEDDED, long_share=0.25)
    assert len(prompts) == 16 and mixed[:12] == prompts[:12] and len(mixed) == 16
    position = {}
    for n, rec in enumerate(iter_sharegpt()):
        messages = to_messages(rec)
        if messages is not None:
            position.setdefault(messages[0]["content"], []).append((n, re.sub(r"_[0-9]+$", "", rec["id"])))
    trained = {meta["base"] for meta in corpus.read_manifest(EMBEDDED) if meta["split"] == "train"}
    drawn = {re.sub(r"_[0-9]+$", "", key) for count, seed, pool in TRAINING_DRAWS
             for key, _ in sample_conversations(count, skip_ids=set(), seed=seed, pool=pool)}
    for prompt in prompts:
        places = position[prompt]  # every record with this first turn: one below 8,000, none trained on
        assert any(n < SHAREGPT_EVAL_FROM for n, _ in places), places
        assert not any(f"sharegpt:{base}" in trained or base in drawn for _, base in places), places
    for task in mixed[12:]:  # long-context tasks over the text of such conversations (a long first turn opens it)
        places = [place for first, found in position.items() if len(first) >= 200 and first[:200] in task
                  for place in found]
        assert places and any(n < SHAREGPT_EVAL_FROM for n, _ in places), task[:200]
        assert not any(f"sharegpt:{base}" in trained or base in drawn for _, base in places), places


# --- Spec-Bench stays evaluation-only ------------------------------------------------------------------------

SPEC_BENCH_MIN_CHARS = 40  # a normalised turn this long inside a prompt is a copy, not a common phrase


def spec_bench_turns() -> list[str]:
    from nanospec_core.paths import DEFAULT_QUESTIONS

    return [turn for line in DEFAULT_QUESTIONS.read_text().splitlines() if line.strip()
            for turn in json.loads(line)["turns"]]


def spec_bench_leaks(prompts: dict[str, str], turns: list[str]) -> list[str]:
    """Training prompts (key -> decoded text) that equal or contain a Spec-Bench turn, after normalise()."""
    normalised = {key: normalise(text) for key, text in prompts.items()}
    whole = {normalise(turn) for turn in turns}
    problems = [f"{key}: its prompt is a Spec-Bench turn" for key, text in normalised.items() if text in whole]
    joined = "\n".join(normalised.values())  # one search per turn over every prompt at once
    for turn in sorted(t for t in whole if len(t) >= SPEC_BENCH_MIN_CHARS):
        if turn in joined:
            problems += [f"{key}: its prompt contains the Spec-Bench turn {turn[:60]!r}"
                         for key, text in normalised.items() if turn in text and text != turn]
    return problems


def test_the_spec_bench_check_catches_a_copied_turn():
    turns = ["Compose an engaging travel blog post about a recent trip to Hawaii.", "Hi"]
    clean = {"a": "Write a poem about the sea.", "b": "hi there"}  # a short turn inside a prompt is no copy
    assert spec_bench_leaks(clean, turns) == []
    assert len(spec_bench_leaks({**clean, "c": "compose an engaging travel blog post about a recent trip to "
                                              "HAWAII"}, turns)) == 1
    assert len(spec_bench_leaks({**clean, "d": "user: Compose an engaging travel blog post about a recent trip "
                                              "to Hawaii. Thanks! assistant:"}, turns)) == 1


def test_no_committed_training_prompt_comes_from_spec_bench():
    """The benchmark's questions ship for evaluation only: no training item's normalised first turn is a Spec-Bench
    turn (the manifest's norm hashes), and no training prompt, decoded, equals or contains one."""
    from nanospec_core.models.loading import resolve_model_dir

    turns = spec_bench_turns()
    assert len(turns) > 480  # MT-Bench's questions have two turns
    bench_norms = {norm_hash(turn) for turn in turns}
    items = [item for item in corpus.read_corpus(EMBEDDED, check=False) if item["meta"]["split"] == "train"]
    assert items and not [i["meta"]["key"] for i in items if i["meta"]["norm"] in bench_norms]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("embedded"), local_files_only=True)
    texts = tokenizer.batch_decode([item["prompt_ids"] for item in items], skip_special_tokens=True)
    assert spec_bench_leaks({item["meta"]["key"]: text for item, text in zip(items, texts)}, turns) == []

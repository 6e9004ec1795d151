"""Text the target only reads (training/read_text.py): what is scored, what stays context, the held-out rule, and
the stage's final phase on the target's own answers."""
import pytest
import torch

from nanospec_core.training import corpus
from nanospec_core.training.read_text import read_item, sharegpt_read_items
from nanospec_core.training.split import HeldOut, base_of, norm_hash


LONG_ANSWER = "def sum of numbers return print list of numbers the answer is the sum of the list"


def conversation(record_id="R_0"):
    return {"id": record_id, "conversations": [
        {"from": "human", "value": "write python code"}, {"from": "gpt", "value": LONG_ANSWER},
        {"from": "human", "value": "translate into french"}, {"from": "gpt", "value": "the quick brown fox"}]}


CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chatml_tokenizer():
    """The tests' tiny tokenizer with a ChatML template (a newline after each role, as Qwen's): the template of
    a conversation extends the template of its first turn token for token, which read items rely on."""
    from tests.conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = CHATML
    return tok


def scored_text(tok, item) -> str:
    ((_, ids, mask),) = corpus.training_items([item], lambda meta: False)
    # position t's label is the distribution of token t + 1: what a scored position teaches is the *next* token
    return tok.decode([ids[t + 1] if t + 1 < len(ids) else item["answer_ids"][-1]
                       for t, on in enumerate(mask) if on])


def test_a_read_item_scores_the_assistant_turns_and_not_the_user_turns():
    tok = chatml_tokenizer()
    (item,) = sharegpt_read_items(tok, [(12, conversation())], lambda meta: False, count=5, max_tokens=512)
    meta = item["meta"]
    assert meta["kind"] == "read" and meta["sampler"] == "original" and meta["record"] == "12:R_0"
    assert meta["base"] == base_of("sharegpt", "R_0") and meta["norm"] == norm_hash("write python code")
    taught = scored_text(tok, item)
    # each assistant turn after its first token (the target's own prediction from the turn's header is not a
    # draft), its stop token included; nothing else
    assert taught == " sum of numbers return print list of numbers the answer is the sum of the list<|im_end|>" \
                     " quick brown fox<|im_end|>"
    for context in ("write python code", "translate into french", "user"):
        assert context not in taught  # the user turns and the template around them are context only
    assert "write python code" in tok.decode(item["prompt_ids"])  # the prompt is the first user turn


def test_a_too_long_conversation_keeps_whole_turns():
    tok = chatml_tokenizer()
    full = sharegpt_read_items(tok, [(1, conversation())], lambda meta: False, count=1, max_tokens=512)[0]
    first_pair = len(tok.apply_chat_template(
        [{"role": "user", "content": "write python code"}, {"role": "assistant", "content": LONG_ANSWER}],
        tokenize=True)["input_ids"])
    cut = read_item(tok, [{"role": "user", "content": "write python code"},
                          {"role": "assistant", "content": LONG_ANSWER},
                          {"role": "user", "content": "translate into french"},
                          {"role": "assistant", "content": "the quick brown fox"}], full["meta"], first_pair + 1)
    assert len(cut["meta"]["scored"]) == 1 and "quick brown fox" not in tok.decode(cut["answer_ids"])


def test_evaluation_records_and_held_out_relatives_never_become_read_items():
    from nanospec_core.vocab.frequency import SHAREGPT_EVAL_FROM

    tok = chatml_tokenizer()
    with pytest.raises(ValueError, match="evaluation-only"):
        sharegpt_read_items(tok, [(SHAREGPT_EVAL_FROM, conversation())], lambda meta: False, count=1)
    held = HeldOut([{"key": "sharegpt:R_1:t0#greedy", "base": "sharegpt:R", "norm": "x", "kind": "chat"}])
    assert sharegpt_read_items(tok, [(3, conversation("R_0"))], held.excludes, count=1) == []  # same base as R_1


def test_user_spans_cover_the_content_of_user_turns_only():
    header, end = [7, 8], 9
    ids = [1, 7, 8, 20, 21, 9, 5, 7, 3, 22, 9, 7, 8, 23, 9]
    assert corpus.user_spans(ids, header, end) == [(3, 5), (13, 14)]  # [7, 3] is no user header
    item = {"meta": {"key": "k", "base": "b", "norm": "n", "split": "train"}, "prompt_ids": ids,
            "answer_ids": [30, 31, 32]}
    ((_, _, plain),) = corpus.training_items([item], lambda meta: False)
    ((_, _, prompts),) = corpus.training_items([item], lambda meta: False, (header, end))
    assert sum(plain) == 2 and [n for n, (a, b) in enumerate(zip(plain, prompts)) if a != b] == [3, 4, 13]


def test_the_stage_finishes_on_the_targets_own_answers(tmp_path, monkeypatch):
    from nanospec_core.training import trainer

    seen = []

    def fake_loss(head, seq, *args, **kwargs):
        seen.append(seq["key"])
        return (head.weight * 0).sum() + 1.0, {"n": 16, "vloss": 0.0, "ploss": 0.0, "correct": 0}

    monkeypatch.setattr(trainer, "sequence_loss", fake_loss)
    seqs = [{"key": f"read{n}"} for n in range(6)] + [{"key": f"answer{n}"} for n in range(3)]
    head = torch.nn.Linear(2, 2)
    state = trainer.train(head, seqs, None, tmp_path, steps=20, tokens_per_step=32, finish_on=[6, 7, 8],
                          finish_fraction=0.25)
    assert state["step"] == 20
    last, first = seen[-5 * 2:], seen[:15 * 2]  # two sequences of 16 tokens per 32-token step
    assert all(key.startswith("answer") for key in last)
    assert any(key.startswith("read") for key in first)

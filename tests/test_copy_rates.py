"""The copy branches' prior is measured, not tuned: copy_rates counts right copies per match length, and the shipped
CopyConfig default is what it measures on the committed corpus."""
from __future__ import annotations

from nanospec_core.config import CopyConfig
from nanospec_core.paths import head_data
from nanospec_core.training.copy_rates import answers, copy_rates


def item(prompt, answer):
    return {"prompt_ids": prompt, "answer_ids": answer}


def test_an_answer_that_repeats_its_prompt_copies_right_after_a_long_match():
    prompt = list(range(10, 40))
    rates = copy_rates([item(prompt, prompt[:20])])
    # From the fourth answer token on the drafter matches 4 tokens of the prompt and the copy is always right
    # (its depth 3+ pools the later tokens of each draft): every 4-gram rate is 1.
    assert rates[3] == (1.0, 1.0, 1.0)


def test_a_wrong_first_copied_token_stops_the_count_at_depth_one():
    # "1 2 3" twice in the prompt, followed by 7 then by 8: the most recent match (8) is drafted, the answer goes 7.
    prompt = [1, 2, 3, 7, 5, 1, 2, 3, 8, 6]
    rates = copy_rates([item(prompt, [1, 2, 3, 7])])
    assert rates[2][0] == 0.0  # the 3-gram "1 2 3" drafted 8 once, and the answer went on with 7
    assert rates[2][1:] == (0.5, 0.5)  # never tried deeper: the neutral 0.5


def test_the_shipped_prior_is_the_corpus_measurement():
    items = answers(head_data("qwen2.5-coder-0.5b-instruct"))
    assert len(items) > 3000
    assert CopyConfig().prior_rows == copy_rates(items)

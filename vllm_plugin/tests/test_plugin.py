"""The plugin inside a real vLLM engine (the CPU build: Model Runner V1, eager), on a tiny random Qwen2 target and
random EAGLE-3 heads (float32). Each engine runs in its own process (nanospec_vllm.phase, tiny_models.phase).

What an engine run must show, beyond greedy output equal to vLLM without speculation (which holds with no plugin at
all: verification is lossless): every draft was scored through the restriction (the plugin's counters), and each
drafted row is what an oracle outside the plugin computes, from vLLM's own record of the row (its request's prompt,
how many ids vLLM had committed for it) and the full head's logits: the argmax over core + prompt + committed ids.
Requests see disjoint prompt vocabularies, join as others finish (3 in flight, 6 prompts) and leave at different
steps; the head has no lm head of its own (vLLM shares the target's after loading).
"""
from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm")
from tiny_models import VOCAB, build_target, export_head, flatten_draft, phase  # noqa: E402

CORE = list(range(64))
MAX_TOKENS = [24, 40, 16, 32, 40, 20]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("tiny")
    target = build_target(root / "target")
    export_head(target, root / "nanospec", {"static_core": CORE, "capacity": 1024, "buffer_capacity": 2048},
                own_lm_head=False, tied_lm_head=True)
    rng = torch.Generator().manual_seed(3)
    prompts = [torch.randint(100 + 500 * k, 600 + 500 * k, (24,), generator=rng).tolist() for k in range(6)]
    return {"root": root, "target": target, "prompts": prompts}


def run(tiny, name, draft, **options):
    options = {"batch": 6, "max_num_seqs": 3, "max_tokens": MAX_TOKENS, **options}
    return phase(tiny["root"], name, tiny["root"] / options.pop("model", "target"),
                 draft and tiny["root"] / draft, options.pop("prompts", tiny["prompts"]), **options)


@pytest.fixture(scope="module")
def greedy(tiny):
    return {"plain": run(tiny, "plain", None),
            "nanospec": run(tiny, "nanospec", "nanospec", env={"NANOSPEC_VLLM_RECORD": str(tiny["root"] / "rec")})}


def test_greedy_output_equals_vllm_without_speculation(greedy):
    assert greedy["nanospec"]["outputs"] == greedy["plain"]["outputs"]
    assert [len(ids) for ids in greedy["nanospec"]["outputs"]] == MAX_TOKENS
    assert greedy["nanospec"]["spec"]["drafts"] > 0  # the drafts were really made and verified


def test_vllms_ngram_peer_runs_here_and_keeps_greedy_output(tiny, greedy):
    """serve-bench's `ngram` configuration (vLLM's prompt lookup, the peer of our copy branches) on this build: prompts
    that repeat themselves give it matches to draft from, and its output is vLLM's without speculation."""
    looped = [(p[:8] * 3)[:24] for p in tiny["prompts"]]
    ngram, plain = run(tiny, "ngram", None, method="ngram", prompts=looped), run(tiny, "plain-looped", None,
                                                                                 prompts=looped)
    assert ngram["outputs"] == plain["outputs"]
    assert ngram["spec"]["drafts"] > 0 and "nanospec" not in ngram


def test_every_draft_step_went_through_the_restriction(greedy):
    stats = greedy["nanospec"]["nanospec"][0]
    assert stats["runner"] == "v1" and stats["restricted_every_step"]
    assert stats["proposals"] > 0 and stats["steps"] == stats["expected_calls"] >= 3 * stats["proposals"]
    assert stats["requests"] == 6 and stats["finished"] >= 3 and stats["full_rows"] == 0
    assert stats["avg_active"] < VOCAB / 8 and stats["avg_scored_rows"] < VOCAB / 2


def oracle_check(result: dict, prompts: list, core: list, draftable=None) -> dict:
    """Each recorded draft row against its set recomputed outside the plugin. Returns counts for the caller."""
    import torch

    stats = result["nanospec"][0]
    record = torch.load(stats["record_file"])
    full = record["full"]
    by_head = {tuple(prompt[:4]): k for k, prompt in enumerate(prompts)}
    outside = 0
    for n, row in enumerate(record["rows"]):
        k = by_head[tuple(row["prompt_head"])]
        expected = set(core) | set(prompts[k]) | set(result["outputs"][k][:row["committed"]])
        if draftable is not None:
            expected &= draftable
        ids = sorted(expected)
        want = ids[int(full[n, ids].argmax())]
        assert row["draft"] == want, f"row {n} (prompt {k}, {row['committed']} committed): drafted {row['draft']}, " \
                                     f"the oracle's set gives {want}"
        assert math.isclose(row["draft_logit"], row["full_logit"], rel_tol=1e-4, abs_tol=1e-4)
        outside += int(full[n].argmax()) not in expected
    return {"rows": len(record["rows"]), "outside": outside}


def test_each_draft_is_the_argmax_over_its_requests_own_set(tiny, greedy):
    counts = oracle_check(greedy["nanospec"], tiny["prompts"], CORE)
    assert counts["rows"] >= 6 * 3
    assert counts["outside"] > counts["rows"] // 2  # the restriction bites: a full head would draft elsewhere


def test_a_pruned_draft_vocabulary_drafts_only_what_it_can(tiny, greedy):
    """EAGLE-3 with d2t (1,024 draft rows: the core and every fourth id): drafts come from the draftable part of
    each request's set, and greedy output stays vLLM's."""
    import torch

    keep = sorted(set(CORE) | set(range(64, VOCAB, 4)))
    d2t = torch.tensor(keep) - torch.arange(len(keep))
    export_head(tiny["target"], tiny["root"] / "pruned", {"static_core": CORE}, draft_vocab_size=len(keep), d2t=d2t)
    result = run(tiny, "pruned", "pruned", env={"NANOSPEC_VLLM_RECORD": str(tiny["root"] / "rec-pruned")})
    assert result["outputs"] == greedy["plain"]["outputs"]
    assert result["nanospec"][0]["restricted_every_step"]
    oracle_check(result, tiny["prompts"], CORE, draftable=set(keep))


def test_committed_ids_join_the_set_at_the_next_step(tiny):
    """A target whose greedy choice is always id 0 (all logits 0) and a head sharing its lm head: a draft is the
    smallest id of its set. The core (1..64) and the prompts lack 0, so each request's first drafts are rejected;
    the 0 it commits then joins its set and every later draft is 0, accepted. With the restriction off every draft
    is accepted; with committed ids never joining (async placeholders) none is."""
    root = tiny["root"]
    target = build_target(root / "constant", constant=True)
    export_head(target, root / "constant_head", {"static_core": list(range(1, 65))}, own_lm_head=False,
                tied_lm_head=True)
    result = run(tiny, "constant", "constant_head", model="constant", prompts=tiny["prompts"][:4], batch=4,
                 max_num_seqs=4, max_tokens=40)
    assert result["outputs"] == [[0] * 40] * 4
    spec = result["spec"]
    assert spec["draft_tokens"] - spec["accepted"] == 3 * 4  # one rejected proposal per request, then all accepted
    assert result["nanospec"][0]["restricted_every_step"]


def test_sampled_output_keeps_the_targets_distribution(tiny):
    """Temperature 1, drafts sampled from the restricted q: rejection sampling must leave the target's distribution.
    A target whose mass sits on the core ids (its lm head reads one hidden dimension there, tiny_models.build_target)
    and a head sharing that lm head with that dimension zeroed (q uniform over each request's set: drafts accepted
    often, not always, tiny_models.flatten_draft); one prompt, 192 samples of 3
    tokens: the second and third tokens (the positions drafts can fill) against the target's exact conditionals
    (transformers, outside vLLM), by a chi-square test (p > 0.001), and the prefill token as a control."""
    import torch

    root = tiny["root"]
    peaked = build_target(root / "peaked", peak=12.0, one_column=CORE)
    export_head(peaked, root / "peaked_head", {"static_core": CORE}, own_lm_head=False, tied_lm_head=True)
    flatten_draft(root / "peaked_head")
    prompt, samples = tiny["prompts"][0], 192
    result = run(tiny, "sampled", "peaked_head", model="peaked", prompts=[prompt] * samples, batch=samples,
                 max_num_seqs=64, max_tokens=3, temperature=1.0, draft_sample_method="probabilistic", seed=7)
    outputs = result["outputs"]
    assert result["spec"]["drafts"] > 0 and 0 < result["spec"]["accepted"] < result["spec"]["draft_tokens"]
    assert result["nanospec"][0]["restricted_every_step"]
    with torch.no_grad():
        for position in range(3):
            contexts = [prompt + out[:position] for out in outputs]
            logits = peaked(torch.tensor(contexts)).logits[:, -1]
            expected = torch.softmax(logits.double(), -1).sum(0)  # E[count] given each sample's own prefix
            observed = torch.bincount(torch.tensor([out[position] for out in outputs]), minlength=VOCAB).double()
            statistic, bins = chi_square(observed, expected)
            assert statistic < chi_square_critical(bins - 1), (position, statistic, bins)


def chi_square(observed, expected, minimum: float = 5.0):
    """Pearson's statistic over the bins expecting >= `minimum`, the rest pooled into one."""
    big = expected >= minimum
    obs = list(observed[big]) + [observed[~big].sum()]
    exp = list(expected[big]) + [expected[~big].sum()]
    pairs = [(o, e) for o, e in zip(obs, exp) if e > 0]
    return float(sum((o - e) ** 2 / e for o, e in pairs)), len(pairs)


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The 0.999 quantile of chi-square(df) (Wilson-Hilferty; z = the normal's 0.999 quantile)."""
    df = max(df, 1)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3

"""Model Runner V1 through the plugin's hook, without an engine: a fake runner around the plugin's wrapper of
GPUModelRunner.propose_draft_token_ids, vLLM's own Eagle3 compute_logits, and an oracle that recomputes every
request's set from its prompt and committed ids (fakes.py). Includes issue 24's defects 2-6 at this level."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
from fakes import (H, K, V, FakeV1Runner, Request, build_model, check_scored, install_v1, scenario,  # noqa: E402
                   share_head, v1_step)
from lockstep import LockstepAllReduce  # noqa: E402

CORE = list(range(8))
NANOSPEC = {"static_core": CORE, "capacity": 128, "buffer_capacity": 256}


@pytest.fixture
def target_head():
    return torch.randn(V, H, generator=torch.Generator().manual_seed(1))


def loaded_model(monkeypatch, target_head, **config):
    """A draft model as vLLM leaves it: loaded, then given the target's head (own_head: the checkpoint's copy of
    it; without one, the draft's own head was never written)."""
    model = build_model(monkeypatch, nanospec=config.pop("nanospec", NANOSPEC), **config)
    model.load_weights([])
    share_head(model, target_head)
    install_v1(monkeypatch)
    return model


def run_scenario(model, reference, asynchronous: bool, steps: int = 10, check=True):
    runner = FakeV1Runner(model)
    prompts, plan = scenario(np.random.default_rng(0), steps)
    requests = {name: Request(list(prompt)) for name, prompt in prompts.items()}
    all_scored = []
    for batch, commits, finished, preempted, resumed in plan:
        all_scored += v1_step(runner, requests, batch, commits, asynchronous=asynchronous, finished=finished,
                              preempted=preempted, resumed=resumed,
                              check=(lambda s, r: check_scored(s, r, CORE, reference)) if check else None)
    return requests, all_scored


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async-placeholders"])
def test_each_row_scores_exactly_its_own_requests_history(monkeypatch, target_head, asynchronous):
    """Requests join at different steps, one is preempted and resumes, two finish; their vocabularies are disjoint,
    so a row given another request's set (or a stale one, or the full vocabulary) fails the oracle. Under async
    scheduling the host holds -1 for every committed id: the sets must still grow (from the sampled tokens)."""
    model = loaded_model(monkeypatch, target_head, own_head=target_head.clone())
    requests, scored = run_scenario(model, target_head, asynchronous)
    assert len(scored) == 10 * K
    assert max(len(r.outputs) for r in requests.values()) > 10  # the sets grew well past the prompts
    stats = model.nanospec_stats()
    assert stats["restricted_every_step"] and stats["proposals"] == 10 and stats["steps"] == 10 * K
    assert stats["commits"] > 0 and stats["full_rows"] == 0


def test_the_oracle_fails_a_plugin_that_restricts_nothing(monkeypatch, target_head):
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    model = loaded_model(monkeypatch, target_head)
    monkeypatch.setattr(type(model), "compute_logits", Eagle3LlamaForCausalLM.compute_logits)  # restriction off
    with pytest.raises(AssertionError, match="scored"):
        run_scenario(model, target_head, asynchronous=False)


def test_the_oracle_fails_rows_given_to_the_wrong_request(monkeypatch, target_head):
    model = loaded_model(monkeypatch, target_head, own_head=target_head.clone())
    requests = {"a": Request([100, 101, 102]), "b": Request([300, 301])}
    scored = v1_step(FakeV1Runner(model), requests, ["a", "b"], {}, asynchronous=False)[0]  # nothing committed
    check_scored(scored, requests, CORE, target_head)
    scored.requests = ["b", "a"]  # a row -> request mix-up
    with pytest.raises(AssertionError, match="scored"):
        check_scored(scored, requests, CORE, target_head)


def test_a_pruned_draft_vocabulary_scores_the_draftable_part_of_each_set(monkeypatch):
    """EAGLE-3's d2t: 214 draft rows, row d scoring target id d + d2t[d] (the core, then even ids from 100 on)."""
    targets = torch.cat([torch.arange(8), 100 + 2 * torch.arange(206)])
    draft_rows = torch.randn(len(targets), H, generator=torch.Generator().manual_seed(2))
    d2t = targets - torch.arange(len(targets))
    model = build_model(monkeypatch, nanospec=NANOSPEC, own_head=draft_rows, d2t=d2t, draft_vocab=len(targets))
    model.load_weights([])
    install_v1(monkeypatch)
    reference = torch.zeros(V, H)
    reference[targets] = draft_rows
    draftable = set(targets.tolist())
    runner = FakeV1Runner(model)
    prompts, plan = scenario(np.random.default_rng(1), 6)
    requests = {name: Request(list(prompt)) for name, prompt in prompts.items()}
    for batch, commits, finished, preempted, resumed in plan:
        v1_step(runner, requests, batch, commits, asynchronous=True, finished=finished, preempted=preempted,
                resumed=resumed, check=lambda s, r: check_scored(s, r, CORE, reference, draftable=draftable))


# ----- issue 24, defects 3-6, at the model -----
def test_the_head_vllm_shares_after_loading_is_the_one_scored(monkeypatch, target_head):
    """A checkpoint without an lm head: vLLM gives the draft the target's after load_weights. The draft's own head
    was never written (NaN here): the scored values must be the target head's."""
    model = loaded_model(monkeypatch, target_head)
    run_scenario(model, target_head, asynchronous=False, steps=3)


def test_a_duplicate_of_the_targets_head_is_not_kept_alive(monkeypatch, target_head):
    import gc
    import weakref

    model = build_model(monkeypatch, nanospec=NANOSPEC, own_head=target_head)
    model.load_weights([])
    own = weakref.ref(model.lm_head.weight)
    share_head(model, target_head.clone())  # equal to the draft's own: vLLM keeps the target's only
    install_v1(monkeypatch)
    run_scenario(model, target_head, asynchronous=False, steps=2)
    gc.collect()
    assert own() is None, "the draft's own V x H head is still referenced"


def test_a_dummy_load_that_skips_load_weights_still_restricts(monkeypatch, target_head):
    model = build_model(monkeypatch, nanospec=NANOSPEC, own_head=target_head)  # --load-format dummy: no load_weights
    install_v1(monkeypatch)
    run_scenario(model, target_head, asynchronous=False, steps=3)


def test_a_weight_reload_keeps_the_live_requests_sets(monkeypatch, target_head):
    model = build_model(monkeypatch, nanospec=NANOSPEC, own_head=target_head)
    model.load_weights([])
    install_v1(monkeypatch)
    runner = FakeV1Runner(model)
    requests = {"a": Request([100, 101, 102]), "b": Request([300, 301])}
    v1_step(runner, requests, ["a", "b"], {"a": [103], "b": [302, 303]}, asynchronous=False)
    reloaded = torch.randn(V, H, generator=torch.Generator().manual_seed(9))
    model.load_weights([("lm_head.weight", reloaded)])  # in place, while both requests run
    v1_step(runner, requests, ["a", "b"], {"a": [104]}, asynchronous=False,
            check=lambda scored, state: check_scored(scored, state, CORE, reloaded))


def test_each_tensor_parallel_rank_scores_the_full_heads_rows(monkeypatch, target_head):
    """TP = 2: each rank's lm head holds half of the vocabulary's rows; global ids must not index the shard."""
    import vllm.distributed

    all_reduce = LockstepAllReduce(2)
    ranks = {threading.get_ident(): None}
    monkeypatch.setattr(vllm.distributed, "tensor_model_parallel_all_reduce",
                        lambda local: ranks[threading.get_ident()](local))
    models = []
    for rank, shard in enumerate(((0, V // 2), (V // 2, V))):
        model = build_model(monkeypatch, nanospec=NANOSPEC, tp_size=2, shard=shard,
                            own_head=target_head[shard[0]:shard[1]])
        model.load_weights([])
        models.append(model)
    install_v1(monkeypatch)
    errors = []

    def rank_run(rank):
        ranks[threading.get_ident()] = all_reduce.of(rank)
        try:
            run_scenario(models[rank], target_head, asynchronous=False, steps=3)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append((rank, error))
            all_reduce.abort()

    threads = [threading.Thread(target=rank_run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0][1]


def test_the_logit_scale_is_applied_once_on_the_full_vocabulary_path(monkeypatch, target_head):
    """A request past its capacity drafts from the full vocabulary (vLLM's own compute_logits, already scaled)."""
    model = loaded_model(monkeypatch, target_head, scale=2.0,
                         nanospec={"static_core": CORE, "capacity": 12, "buffer_capacity": 64})
    runner = FakeV1Runner(model)
    requests = {"small": Request([100, 101]), "big": Request(list(range(200, 220)))}  # 8 + 20 > 12
    for scored in v1_step(runner, requests, ["small", "big"], {}, asynchronous=False):  # nothing committed
        full = scored.hidden @ target_head.T * 2.0
        assert torch.allclose(scored.logits[1], full[1], atol=1e-4)
        check_scored(type(scored)(["small"], scored.hidden[:1], scored.logits[:1]), requests, CORE, target_head,
                     transform=lambda x: x * 2.0)
    assert model.nanospec_stats()["full_rows"] == K


def test_local_argmax_reduction_drafts_from_the_set(monkeypatch, target_head):
    """use_local_argmax_reduction makes the proposer call get_top_tokens instead of compute_logits."""
    model = loaded_model(monkeypatch, target_head)
    runner = FakeV1Runner(model)
    requests = {"a": Request([100, 101, 102]), "b": Request([300, 301])}
    picked = []

    def top_tokens_proposer(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        hidden = torch.randn(2, H, generator=self.generator)
        picked.append((hidden, self.drafter.model.get_top_tokens(hidden)))

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from nanospec_vllm import hooks

    monkeypatch.setattr(GPUModelRunner, "propose_draft_token_ids", top_tokens_proposer)
    hooks.install()
    v1_step(runner, requests, ["a", "b"], {}, asynchronous=False)
    hidden, tokens = picked[0]
    for row, name in enumerate("ab"):
        ids = sorted(set(CORE) | set(requests[name].prompt))
        assert tokens[row].item() == ids[int((hidden[row] @ target_head[ids].T).argmax())]


# ----- start-up: the runner in use, and what is refused -----
@pytest.mark.parametrize("setting, line", [
    ({"pp": 2}, "pipeline_parallel_size=1"),
    ({"dcp": 2}, "decode_context_parallel_size=1"),
    ({"async_scheduling": True, "padded": False}, "disable_padded_drafter_batch=False"),
])
def test_a_mode_the_plugin_cannot_restrict_is_refused_at_start_up(monkeypatch, setting, line):
    from nanospec_vllm.hooks import HookError

    with pytest.raises(HookError, match=line) as refused:
        build_model(monkeypatch, nanospec=NANOSPEC, **setting)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("v2, asynchronous", [(False, False), (True, True)])
def test_the_start_up_line_names_the_runner(monkeypatch, caplog, v2, asynchronous):
    import logging

    with caplog.at_level(logging.INFO, logger="vllm.nanospec"):
        model = build_model(monkeypatch, nanospec=NANOSPEC, v2=v2, async_scheduling=asynchronous)
    assert model.nanospec.runner == ("v2" if v2 else "v1")
    assert f"Model Runner {'V2' if v2 else 'V1'}" in caplog.text
    assert f"async scheduling {'on' if asynchronous else 'off'}" in caplog.text


def test_every_hooked_method_exists_and_is_wrapped():
    from nanospec_vllm import hooks

    hooks.check()
    hooks.install()
    for runner, classes in (("v1", hooks.v1_classes), ("v2", hooks.v2_classes)):
        found = classes()
        for key, name, _ in hooks.SURFACE[runner]:
            assert getattr(getattr(found[key], name), "_nanospec", False), f"{runner}: {name} not wrapped"


def test_an_unmapped_call_inside_a_proposal_is_reported(monkeypatch, target_head, caplog):
    """Never a silent full-vocabulary run: a draft call the hooks could not map shows in the stats and the log."""
    import logging

    model = loaded_model(monkeypatch, target_head)
    runner = FakeV1Runner(model)
    requests = {"a": Request([100, 101])}
    original = model.nanospec.logits

    def lose_the_map(hidden, full_logits):
        model.nanospec.rows = None  # as if vLLM called the head from a path the hooks do not reach
        return original(hidden, full_logits)

    monkeypatch.setattr(model.nanospec, "logits", lose_the_map)
    with caplog.at_level(logging.WARNING, logger="vllm.nanospec"):
        v1_step(runner, requests, ["a"], {}, asynchronous=False)
        stats = model.nanospec_stats()
    assert not stats["restricted_every_step"] and stats["unrestricted_calls"] == K
    assert "did not apply" in caplog.text


def test_another_vllm_version_is_named_at_start_up(monkeypatch, caplog):
    """Defect 6 (issue 35): the hooks were written for one vLLM; another one starts with a warning naming both."""
    import logging

    import vllm

    from nanospec_vllm import hooks

    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    with caplog.at_level(logging.WARNING, logger="vllm.nanospec"):
        hooks.check()
    assert "0.33.1" in caplog.text and hooks.WRITTEN_FOR in caplog.text
    caplog.clear()
    monkeypatch.setattr(vllm, "__version__", hooks.WRITTEN_FOR + "+cpu")  # the CPU build's local version
    with caplog.at_level(logging.WARNING, logger="vllm.nanospec"):
        hooks.check()
    assert "written for" not in caplog.text

"""Model Runner V2 through the plugin's hooks, without a GPU: vLLM's own DraftModelSpeculator.sample_draft and
compute_draft_logits (greedy, and the local-argmax path) inside a fake speculator, the plugin's wrappers around a
fake V2 runner's add_requests / finish_requests / postprocess_sampled and the speculator's propose, and the oracle of
fakes.py. On a GPU the same sample_draft runs inside the speculator's FULL CUDA graph: the tests here check what
makes that safe (no host reads, the same ops and shapes for any batch) and that the device counters see every call.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
from fakes import H, K, V, Request, Scored, build_model, check_scored, scenario, share_head  # noqa: E402
from vllm.v1.worker.gpu.spec_decode.speculator import DraftModelSpeculator  # noqa: E402

CORE = list(range(8))
NANOSPEC = {"static_core": CORE, "capacity": 128, "buffer_capacity": 256}
SLOTS = 6


class FakeSpeculator(DraftModelSpeculator):
    """EAGLE's speculator, as far as the draft lm head sees it: `propose` copies the batch's request-state indices
    into its own idx_mapping buffer and samples K draft positions through vLLM's sample_draft."""

    def __init__(self, model, max_num_reqs: int, local_argmax: bool = False):
        self.model = model
        self.num_speculative_steps = K
        self.idx_mapping = torch.zeros(max_num_reqs, dtype=torch.int64)
        self.use_local_argmax_reduction = local_argmax
        self.draft_watermarker, self.acceptance_estimator = None, None
        self.scored: list[Scored] = []
        self.rows: list = []
        self.generator = torch.Generator().manual_seed(0)
        self.padding = 0

    def init_cudagraph_manager(self, cudagraph_mode): ...

    def capture(self): ...

    def load_draft_model(self, target_model, target_attn_layer_names): ...

    def load_model(self, target_model): ...

    def propose(self, input_batch, attn_metadata, slot_mappings, last_hidden_states, aux_hidden_states, num_sampled,
                num_rejected, last_sampled, next_prefill_tokens, temperature, seeds, dp_sync_state=None,
                dummy_run=False, skip_attn_for_dummy_run=False, mm_inputs=None, is_profile=False,
                num_speculative_tokens=None):
        rows = input_batch.num_reqs + self.padding  # a captured graph's padded batch: idx -1 past the requests
        self.idx_mapping.fill_(-1)
        if not dummy_run:
            self.idx_mapping[:input_batch.num_reqs] = input_batch.idx_mapping
        self.rows = list(input_batch.req_ids) + [None] * self.padding
        step = torch.zeros((), dtype=torch.int64)
        for _ in range(K):
            hidden = torch.randn(rows, H, generator=self.generator)
            self.sample_draft(hidden, torch.zeros(rows, dtype=torch.int64), self.idx_mapping[:rows], None, None,
                              step, None)

    def compute_draft_logits(self, hidden_states, spec_step_idx):
        logits = super().compute_draft_logits(hidden_states, spec_step_idx)
        self.scored.append(Scored(self.rows, hidden_states, logits))
        return logits

    def get_draft_top_tokens(self, hidden_states, spec_step_idx):
        tokens = super().get_draft_top_tokens(hidden_states, spec_step_idx)
        self.scored.append(Scored(self.rows, hidden_states, tokens))
        return tokens


class FakeV2Runner:
    """The V2 runner's request states: a request's slot is the index it gets from req_states' free list."""

    def __init__(self, speculator, max_num_reqs: int):
        self.speculator = speculator
        self.req_states = SimpleNamespace(req_id_to_index={}, index_to_req_id={},
                                          free_indices=list(range(max_num_reqs)))

    def finish_requests(self, scheduler_output):
        for request in sorted(scheduler_output.finished_req_ids | (scheduler_output.preempted_req_ids or set())):
            index = self.req_states.req_id_to_index.pop(request, None)
            if index is not None:
                del self.req_states.index_to_req_id[index]
                self.req_states.free_indices.append(index)

    def add_requests(self, scheduler_output):
        for new in scheduler_output.scheduled_new_reqs:
            index = self.req_states.free_indices.pop()
            self.req_states.req_id_to_index[new.req_id] = index
            self.req_states.index_to_req_id[index] = new.req_id

    def postprocess_sampled(self, idx_mapping, sampled_tokens, num_sampled, num_rejected, query_start_loc=None):
        pass  # vLLM's post_update (a Triton kernel): books the tokens on the device

    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        pass


def v2_engine(monkeypatch, target_head, local_argmax=False, **config):
    from nanospec_vllm import hooks

    model = build_model(monkeypatch, nanospec=config.pop("nanospec", NANOSPEC), v2=True, async_scheduling=True,
                        max_num_seqs=SLOTS, **config)
    model.load_weights([])
    share_head(model, target_head)
    hooks.install()
    hooks._install_v2({"runner": FakeV2Runner, "speculator": FakeSpeculator, "eagle": FakeSpeculator})
    runner = FakeV2Runner(FakeSpeculator(model, SLOTS, local_argmax), SLOTS)
    runner.speculator.load_model(None)  # the hook builds the vocabulary here, from the head vLLM shared
    return model, runner


def v2_step(runner, requests: dict, batch, commits, finished=(), preempted=(), joined=(), check=None):
    """One engine step in V2's order: finish -> add -> (forward, sample) -> postprocess_sampled -> propose.
    A request joining (or resuming) sends its prompt and outputs so far, as V2's scheduler does."""
    new = [SimpleNamespace(req_id=name, prefill_token_ids=requests[name].prompt + requests[name].outputs,
                           prompt_token_ids=requests[name].prompt) for name in joined]
    output = SimpleNamespace(finished_req_ids=set(finished), preempted_req_ids=set(preempted),
                             scheduled_new_reqs=new)
    runner.finish_requests(output)
    runner.add_requests(output)
    index = torch.tensor([runner.req_states.req_id_to_index[name] for name in batch], dtype=torch.int64)
    sampled = torch.full((len(batch), K + 1), 7777, dtype=torch.int64)  # past num_sampled: garbage, as on the GPU
    for row, name in enumerate(batch):
        ids = commits.get(name, [])
        sampled[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    num_sampled = torch.tensor([len(commits.get(name, [])) for name in batch], dtype=torch.int32)
    runner.postprocess_sampled(index, sampled, num_sampled, None)
    start = len(runner.speculator.scored)
    batch_state = SimpleNamespace(req_ids=list(batch), num_reqs=len(batch), idx_mapping=index)
    runner.speculator.propose(batch_state, None, None, None, None, num_sampled, None, None, None, None, None)
    for scored in runner.speculator.scored[start:]:
        if check is not None:
            check(scored, requests)
    for name in batch:
        requests[name].outputs += commits.get(name, [])
    return runner.speculator.scored[start:]


def run_v2_scenario(runner, reference, steps=10, padding=0):
    runner.speculator.padding = padding
    prompts, plan = scenario(np.random.default_rng(0), steps)
    requests = {name: Request(list(prompt)) for name, prompt in prompts.items()}
    seen = set()

    def check(scored, state):
        real = Scored(scored.requests[:len(scored.requests) - padding], scored.hidden, scored.logits)
        if padding:
            real.hidden, real.logits = scored.hidden[:-padding], scored.logits[:-padding]
            for row in scored.logits[-padding:]:  # padded rows: the reserved set (the core), never all -inf
                assert set(torch.isfinite(row).nonzero().flatten().tolist()) == set(CORE)
        check_scored(real, state, CORE, reference)

    for batch, commits, finished, preempted, resumed in plan:
        joined = [name for name in batch if name not in seen or name in resumed]
        seen |= set(batch)
        v2_step(runner, requests, batch, commits, finished, preempted, joined, check=check)
    return requests


@pytest.fixture
def target_head():
    return torch.randn(V, H, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("padding", [0, 2], ids=["exact-batch", "padded-graph-batch"])
def test_each_row_scores_exactly_its_own_requests_history(monkeypatch, target_head, padding):
    """V2 never books sampled ids on the host: the sets grow from postprocess_sampled's device tensors. Slots are
    request-state indices, reused as requests finish and join; a preempted request resumes with its outputs."""
    model, runner = v2_engine(monkeypatch, target_head)
    requests = run_v2_scenario(runner, target_head, padding=padding)
    assert max(len(r.outputs) for r in requests.values()) > 10
    stats = model.nanospec_stats()
    assert stats["runner"] == "v2" and stats["restricted_every_step"]
    assert stats["proposals"] == 10 and stats["steps"] == stats["expected_calls"] == 10 * K
    assert stats["commits"] > 0 and stats["full_rows"] == 0 and stats["fallback_rows"] == 0


def test_local_argmax_reduction_drafts_from_the_set(monkeypatch, target_head):
    model, runner = v2_engine(monkeypatch, target_head, local_argmax=True)
    requests = {"a": Request([100, 101, 102]), "b": Request([300, 301])}
    tokens = v2_step(runner, requests, ["a", "b"], {}, joined=["a", "b"])[0]
    for row, name in enumerate("ab"):
        ids = sorted(set(CORE) | set(requests[name].prompt))
        assert tokens.logits[row].item() == ids[int((tokens.hidden[row] @ target_head[ids].T).argmax())]


def test_a_draft_call_the_hooks_do_not_reach_shows_in_stats_and_log(monkeypatch, target_head, caplog):
    import logging

    model, runner = v2_engine(monkeypatch, target_head)
    monkeypatch.setattr(FakeSpeculator, "sample_draft", lambda self, hidden, *args, **kwargs:
                        self.model.compute_logits(hidden).argmax(-1))  # an unhooked route to the head
    requests = {"a": Request([100, 101])}
    with caplog.at_level(logging.WARNING, logger="vllm.nanospec"):
        v2_step(runner, requests, ["a"], {}, joined=["a"])
        stats = model.nanospec_stats()
    assert not stats["restricted_every_step"] and stats["steps"] == 0 and stats["expected_calls"] == K
    assert "did not apply to 3 of 3" in caplog.text


def test_dummy_runs_are_not_drafts(monkeypatch, target_head):
    model, runner = v2_engine(monkeypatch, target_head)
    batch = SimpleNamespace(req_ids=[], num_reqs=2, idx_mapping=torch.zeros(2, dtype=torch.int64))
    runner.speculator.propose(batch, None, None, None, None, None, None, None, None, None, None, dummy_run=True)
    stats = model.nanospec_stats()
    assert stats["proposals"] == 0 and stats["steps"] == 0


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op with its output shapes; a host read (item/nonzero/...) fails at once."""

    SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
               "aten.equal", "aten.is_nonzero"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        assert name not in self.SYNCING, f"{name}: a host read inside the draft step"
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                  if isinstance(t, torch.Tensor)]
        self.ops.append((name, shapes))
        return out


def test_the_draft_step_reads_nothing_back_and_runs_the_same_ops_for_any_batch(monkeypatch, target_head):
    """What vLLM records as the speculator's FULL CUDA graph: sample_draft with the plugin's head. Two batches with
    different requests, sets and slots (same padded size) must run the same ops on the same shapes, with no host
    read and no tensor built from host data."""
    model, runner = v2_engine(monkeypatch, target_head)
    requests = {"a": Request([100, 101]), "b": Request(list(range(300, 340))), "c": Request([400])}
    v2_step(runner, requests, ["a", "b"], {"a": [102]}, joined=["a", "b"])
    v2_step(runner, requests, ["c", "a"], {"c": [401, 402]}, joined=["c"], finished=["b"])
    speculator, traces = runner.speculator, []

    def no_host_data(*args, **kwargs):
        raise AssertionError("a tensor built from host data inside the draft step")

    for batch in (["a", "c", None], ["c", None, None]):
        index = [runner.req_states.req_id_to_index[name] if name else -1 for name in batch]
        speculator.idx_mapping[:3] = torch.tensor(index)
        speculator.rows = batch
        hidden = torch.randn(3, H)
        with monkeypatch.context() as patch:
            for name in ("tensor", "as_tensor", "from_numpy"):
                patch.setattr(torch, name, no_host_data)
            for name in ("tolist", "item", "numpy", "cpu"):
                patch.setattr(torch.Tensor, name, no_host_data)
            with HostReads() as trace:
                speculator.sample_draft(hidden, torch.zeros(3, dtype=torch.int64), speculator.idx_mapping[:3],
                                        None, None, torch.zeros((), dtype=torch.int64), None)
        traces.append(trace.ops)
    assert traces[0] == traces[1]


def test_a_pruned_head_and_a_reload_keep_working_inside_the_graph_buffers(monkeypatch):
    targets = torch.cat([torch.arange(8), 100 + 2 * torch.arange(206)])
    draft_rows = torch.randn(len(targets), H, generator=torch.Generator().manual_seed(2))
    from nanospec_vllm import hooks

    model = build_model(monkeypatch, nanospec=NANOSPEC, v2=True, async_scheduling=True, max_num_seqs=SLOTS,
                        own_head=draft_rows, d2t=targets - torch.arange(len(targets)), draft_vocab=len(targets))
    model.load_weights([])
    hooks.install()
    hooks._install_v2({"runner": FakeV2Runner, "speculator": FakeSpeculator, "eagle": FakeSpeculator})
    runner = FakeV2Runner(FakeSpeculator(model, SLOTS), SLOTS)
    runner.speculator.load_model(None)
    vocab = model.nanospec.vocab
    where = [t.data_ptr() for t in (vocab.buffer_rows, vocab.member, vocab.buffer_ids)]
    reference = torch.zeros(V, H)
    reference[targets] = draft_rows
    draftable = set(targets.tolist())
    requests = {"a": Request([100, 101, 102, 104]), "b": Request([300, 302, 303])}
    v2_step(runner, requests, ["a", "b"], {"a": [106, 107]}, joined=["a", "b"],
            check=lambda s, r: check_scored(s, r, CORE, reference, draftable=draftable))
    reloaded = torch.randn(len(targets), H)
    model.load_weights([("lm_head.weight", reloaded)])
    reference[targets] = reloaded
    v2_step(runner, requests, ["a", "b"], {"b": [304]},
            check=lambda s, r: check_scored(s, r, CORE, reference, draftable=draftable))
    assert [t.data_ptr() for t in (vocab.buffer_rows, vocab.member, vocab.buffer_ids)] == where


class OwnPropose(FakeSpeculator):
    """A speculator subclass with its own propose, which the plugin's wrapper (on the base class) never sees."""

    def propose(self, *args, **kwargs):
        return FakeSpeculator.propose.__wrapped__(self, *args, **kwargs)


def test_a_propose_the_hooks_miss_is_reported_and_the_sets_still_reach_the_device(monkeypatch, target_head, caplog):
    """Defect 2 (issue 35): without the propose wrapper nothing is flushed before the draft and no proposal is
    counted. That degraded mode must show (a counter, the warning, restricted_every_step False), and the host's
    writes still reach the device: they are flushed when the step's sampled tokens arrive."""
    import logging

    model, runner = v2_engine(monkeypatch, target_head)
    runner.speculator = OwnPropose(model, SLOTS)
    requests = {"a": Request([100, 101]), "b": Request([300])}

    def check(scored, state):
        check_scored(scored, state, CORE, target_head)

    with caplog.at_level(logging.WARNING, logger="vllm.nanospec"):
        for step in range(3):
            v2_step(runner, requests, ["a", "b"], {"a": [110 + step], "b": [310 + step]},
                    joined=["a", "b"] if step == 0 else (), check=check)
        stats = model.nanospec_stats()
    assert stats["proposals"] == 0 and stats["unhooked_steps"] == 2 and not stats["restricted_every_step"]
    assert "propose" in caplog.text and "2 engine steps" in caplog.text

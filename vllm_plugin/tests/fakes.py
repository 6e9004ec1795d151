"""Fakes of what vLLM hands the plugin, for tests that need no engine (and no GPU): a draft model built without a
real model config, V1's runner around its proposer call, V2's runner and speculator around `sample_draft`, and an
oracle that recomputes each request's set from its own prompt and committed ids, outside the plugin.

The draft model is the plugin's class; only vLLM's Eagle3LlamaForCausalLM.__init__ / load_weights are replaced (by
`build_model`) with what they leave behind: `config`, `lm_head` (the draft's own head: uninitialised memory, here NaN,
unless the checkpoint had one), `logits_processor`, `draft_id_to_target_id`. Its compute_logits is vLLM's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

V, H, K = 512, 16, 3  # vocabulary, hidden size, draft positions per step


class FakeHead(torch.nn.Module):
    """A vocab-parallel lm head's surface: weight [rows on this rank, H], tp_size, shard_indices, quant_method."""

    def __init__(self, weight: torch.Tensor, tp_size: int = 1, shard: tuple[int, int] | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.tp_size = tp_size
        start, end = shard or (0, weight.shape[0])
        self.shard_indices = SimpleNamespace(org_vocab_start_index=start, org_vocab_end_index=end)
        self.quant_method = None


class FakeLogitsProcessor:
    """vLLM's LogitsProcessor on one rank: the head's product, soft cap, scale."""

    def __init__(self, scale: float = 1.0, soft_cap: float | None = None):
        self.scale, self.soft_cap = scale, soft_cap

    def __call__(self, lm_head, hidden_states):
        logits = F.linear(hidden_states, lm_head.weight)
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        return logits * self.scale if self.scale != 1.0 else logits

    def get_top_tokens(self, lm_head, hidden_states):  # use_local_argmax_reduction: the full head's argmax
        return self(lm_head, hidden_states).argmax(dim=-1)


def vllm_config(*, max_num_seqs: int = 4, v2: bool = False, async_scheduling: bool = False, pp: int = 1,
                dcp: int = 1, padded: bool = True, nanospec: dict | None = None, draft_vocab: int = V,
                **fake) -> SimpleNamespace:
    hf_config = SimpleNamespace(vocab_size=V, draft_vocab_size=draft_vocab, nanospec=nanospec or {})
    return SimpleNamespace(
        use_v2_model_runner=v2,
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, async_scheduling=async_scheduling),
        parallel_config=SimpleNamespace(pipeline_parallel_size=pp, decode_context_parallel_size=dcp,
                                        prefill_context_parallel_size=1),
        speculative_config=SimpleNamespace(draft_model_config=SimpleNamespace(hf_config=hf_config),
                                           disable_padded_drafter_batch=not padded),
        fake=fake)


def _base_init(self, *, vllm_config, prefix=""):
    torch.nn.Module.__init__(self)
    fake = vllm_config.fake
    self.config = vllm_config.speculative_config.draft_model_config.hf_config
    own = fake.get("own_head")
    if own is None:  # no lm head in the checkpoint: what ParallelLMHead allocates, never written
        own = torch.full((self.config.draft_vocab_size, H), float("nan"))
    self.lm_head = FakeHead(own.clone(), fake.get("tp_size", 1), fake.get("shard"))
    self.logits_processor = FakeLogitsProcessor(fake.get("scale", 1.0), fake.get("soft_cap"))
    d2t = fake.get("d2t")
    self.draft_id_to_target_id = None if d2t is None else torch.nn.Parameter(d2t.clone(), requires_grad=False)


def _base_load_weights(self, weights):
    loaded = set()
    for name, tensor in weights:  # in place, as vLLM's weight loaders do
        getattr(self, name.split(".")[0]).weight.data.copy_(tensor)
        loaded.add(name)
    return loaded


def build_model(monkeypatch, **config):
    """The plugin's draft model over the fakes above (vllm_config options; fake ones: own_head, scale, soft_cap,
    d2t, tp_size, shard)."""
    from nanospec_vllm.model import NanoSpecEagle3LlamaForCausalLM

    monkeypatch.setattr(Eagle3LlamaForCausalLM, "__init__", _base_init)
    monkeypatch.setattr(Eagle3LlamaForCausalLM, "load_weights", _base_load_weights)
    return NanoSpecEagle3LlamaForCausalLM(vllm_config=vllm_config(**config))


def share_head(model, weight: torch.Tensor) -> None:
    """What vLLM's load_eagle_model / _maybe_share_lm_head do after loading: the target's head replaces the draft's."""
    del model.lm_head
    model.lm_head = FakeHead(weight)


# ----- what was scored, and the oracle -----
@dataclass
class Scored:
    requests: list  # the request of each row, as the runner ordered them
    hidden: torch.Tensor  # [R, H]
    logits: torch.Tensor  # [R, V]

    def sets(self) -> list[set[int]]:
        return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in self.logits]


@dataclass
class Request:
    prompt: list
    outputs: list = field(default_factory=list)  # committed ids, in order, of steps before the current one


def expected_set(request: Request, core, draftable=None) -> set[int]:
    """The oracle: core + prompt + committed ids, the draftable ones."""
    ids = set(core) | set(request.prompt) | set(request.outputs)
    return ids if draftable is None else ids & draftable


def check_scored(scored: Scored, requests: dict, core, reference, transform=lambda x: x, draftable=None) -> None:
    """Each row's finite logits are its own request's recomputed set, at the reference head's values."""
    for row, (name, got) in enumerate(zip(scored.requests, scored.sets())):
        want = expected_set(requests[name], core, draftable)
        assert got == want, (f"row {row} ({name}): scored {len(got)} ids, expected {len(want)}; only scored "
                              f"{sorted(got - want)[:8]}, only expected {sorted(want - got)[:8]}")
        ids = sorted(want)
        values = transform(scored.hidden[row] @ reference[ids].T)
        assert torch.allclose(scored.logits[row, ids], values, atol=1e-4), f"row {row} ({name}): wrong values"


# ----- Model Runner V1 around the proposer -----
class FakeV1Runner:
    """The V1 runner's surface: input_batch (req_ids, token_ids_cpu, num_tokens_no_spec, num_prompt_tokens),
    discard_request_mask.np, drafter.model."""

    def __init__(self, model, max_len: int = 256, slots: int = 8):
        self.drafter = SimpleNamespace(model=model)
        self.input_batch = SimpleNamespace(req_ids=[], token_ids_cpu=np.zeros((slots, max_len), dtype=np.int32),
                                           num_tokens_no_spec=np.zeros(slots, dtype=np.int32),
                                           num_prompt_tokens=np.zeros(slots, dtype=np.int32))
        self.discard_request_mask = SimpleNamespace(np=np.zeros(slots, dtype=bool))
        self.scored: list[Scored] = []
        self.generator = torch.Generator().manual_seed(0)


def fake_propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata=None, *args, **kw):
    """Stands in for vLLM's proposer: K draft positions, each one compute_logits call over the batch's rows."""
    rows = list(self.input_batch.req_ids)
    for _ in range(K):
        hidden = torch.randn(len(rows), H, generator=self.generator)
        self.scored.append(Scored(rows, hidden, self.drafter.model.compute_logits(hidden)))
    return None


def v1_step(runner, requests: dict, batch: list, commits: dict, *, asynchronous: bool, finished=(),
            preempted=(), resumed=(), check=None) -> list[Scored]:
    """One engine step through the plugin's wrapper of GPUModelRunner.propose_draft_token_ids.

    The host's lists as V1 leaves them: prompt, then each committed id booked as itself (sync) or as -1 (async
    scheduling; a resumed request's outputs are recovered from the scheduler, real ids). sampled: this step's
    commits per row, -1 at the rest (rejected drafts). check(scored, requests): run on each draft position's
    scores before this step's commits are booked (the oracle's view of the step)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    batch_state = runner.input_batch
    batch_state.req_ids = list(batch)
    for row, name in enumerate(batch):
        request = requests[name]
        outputs = request.outputs if (not asynchronous or name in resumed) else [-1] * len(request.outputs)
        ids = request.prompt + outputs
        batch_state.token_ids_cpu[row, :len(ids)] = ids
        batch_state.num_tokens_no_spec[row] = len(ids)
        batch_state.num_prompt_tokens[row] = len(request.prompt)
    sampled = torch.full((len(batch), K + 1), -1, dtype=torch.long)
    for row, name in enumerate(batch):
        sampled[row, :len(commits.get(name, []))] = torch.tensor(commits.get(name, []), dtype=torch.long)
    output = SimpleNamespace(finished_req_ids=set(finished), preempted_req_ids=set(preempted))
    start = len(runner.scored)
    GPUModelRunner.propose_draft_token_ids(runner, output, sampled, None)
    for scored in runner.scored[start:]:
        if check is not None:
            check(scored, requests)
    for name in batch:  # booked after the draft, as V1 does
        requests[name].outputs += commits.get(name, [])
    return runner.scored[start:]


def install_v1(monkeypatch):
    """The plugin's hooks around a fake proposer call (vLLM's real one needs a real engine)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from nanospec_vllm import hooks

    monkeypatch.setattr(GPUModelRunner, "propose_draft_token_ids", fake_propose_draft_token_ids)
    hooks.install()


def scenario(rng: np.random.Generator, steps: int = 10):
    """Requests with disjoint vocabularies joining, committing, being preempted and resumed, finishing; per step:
    (batch, commits, finished, preempted, resumed). Request k's ids are in [100 + 40k, 140 + 40k)."""
    def ids(k, n):
        return [int(i) for i in rng.integers(100 + 40 * k, 140 + 40 * k, n)]

    prompts = {f"r{k}": ids(k, int(rng.integers(3, 8))) for k in range(6)}
    plan = []
    live, waiting, paused = ["r0", "r1"], ["r2", "r3", "r4", "r5"], []
    for step in range(steps):
        finished, preempted, resumed = set(), set(), set()
        if step == 3:  # r1 is preempted, to come back two steps later with its outputs
            live.remove("r1")
            paused.append("r1")
            preempted.add("r1")
        if step == 5:
            live.append(paused.pop())
            resumed.add("r1")
        if step in (2, 4, 6) and waiting:  # joins
            live.append(waiting.pop(0))
        if step in (6, 8):  # leaves
            gone = live.pop(0)
            finished.add(gone)
        commits = {name: ids(int(name[1:]), int(rng.integers(1, K + 2))) for name in live}
        plan.append((list(live), commits, finished, preempted, resumed))
    return prompts, plan

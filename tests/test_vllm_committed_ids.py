"""Committed ids from the device's sampled tokens (vllm_plugin/nanospec_vllm/committed.py), without vLLM: the layouts
the two model runners hand over, with async scheduling's placeholders, and what reaches each request's set."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vllm_plugin"))
from nanospec_vllm.committed import stage_v1, stage_v2  # noqa: E402
from nanospec_vllm.restriction import Restriction, Settings  # noqa: E402
from nanospec_vllm.rows import HeadRows  # noqa: E402
from nanospec_vllm.scoring import LogitTransform  # noqa: E402

V, H = 300, 8


def test_v1_sampled_tokens_skip_rejected_positions_and_discarded_rows():
    sampled = torch.tensor([[11, 12, -1, -1], [21, -1, -1, -1], [31, 32, 33, 34], [99, -1, -1, -1]])
    staged = stage_v1(["a", "b", "c", "chunk"], sampled, discarded_rows=np.array([3]))  # row 3: a partial prefill
    assert staged.resolve(V) == {"a": [11, 12], "b": [21], "c": [31, 32, 33, 34]}
    host_lists = stage_v1(["a", "b"], [[5, 6], []], discarded_rows=None)  # vLLM drafting after its bookkeeping
    assert host_lists.resolve(V) == {"a": [5, 6]}


def test_v2_rows_keep_the_request_they_had_when_sampled():
    """V2 rows are request-state indices; index 4 goes to a new request before the next step reads the tokens."""
    index_to_request = {4: "old", 7: "b"}
    staged = stage_v2(idx_mapping=torch.tensor([4, 7, -1]), sampled=torch.tensor([[1, 2, 3], [5, 6, 7], [8, 8, 8]]),
                      num_sampled=torch.tensor([2, 3, 1], dtype=torch.int32), state_requests=index_to_request)
    index_to_request[4] = "new"  # the runner reuses the freed index
    assert staged.resolve(V) == {"old": [1, 2], "b": [5, 6, 7]}


def engine_step(restriction, batch, history, sampled):
    """One V1 step as the runner hook runs it: the host's lists (with placeholders) and the device's samples."""
    restriction.begin_v1(list(batch), lambda row: history[batch[row]], gone=set(),
                         staged=stage_v1(list(batch), sampled, None))
    scored = restriction.logits(torch.randn(len(batch), H), None)
    restriction.end_step()
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in scored]


def test_under_async_scheduling_the_sets_grow_from_the_sampled_tokens_not_the_placeholders():
    """Async scheduling books every sampled token on the host as -1 and never replaces it. The sets must still grow
    by the committed ids, one step later (the tokens of step t are read back at step t + 1)."""
    weight = torch.randn(V, H)
    restriction = Restriction(Settings(static_core=(0,), capacity=64, buffer_capacity=128), slots=2,
                              vocab_size=V, runner="v1", rows=lambda: HeadRows(weight, V), transform=LogitTransform)
    history = {"a": [100, 101], "b": [200]}  # prompts
    sampled = {"a": [[110], [111, 112], [113]], "b": [[210, 211], [212], [213]]}
    committed = {"a": [], "b": []}
    for step in range(3):
        rows = engine_step(restriction, ["a", "b"], history,
                           torch.tensor([sampled["a"][step] + [-1] * (2 - len(sampled["a"][step])),
                                         sampled["b"][step] + [-1] * (2 - len(sampled["b"][step]))]))
        for request, scored in zip("ab", rows):
            prompt = {100, 101} if request == "a" else {200}
            assert scored == {0} | prompt | set(committed[request]), (step, request)
        for request in "ab":  # the host books placeholders only
            history[request] = history[request] + [-1] * len(sampled[request][step])
            committed[request] += sampled[request][step]
    assert restriction.stats.commits == 3 + 3  # steps 0 and 1 read back (step 2's at the next step)


# ----- issue 35, defect 3: the next step never waits for a copy still running -----
class RunningCopy:
    """A copy's event that answers 'not finished' to its first `busy` queries; waiting on it would stall the host."""

    def __init__(self, busy: int):
        self.busy = busy

    def query(self) -> bool:
        self.busy -= 1
        return self.busy < 0

    def synchronize(self):
        raise AssertionError("resolve() waited on the device inside an engine step")


def test_a_copy_still_running_is_deferred_to_a_later_step_not_waited_for():
    weight = torch.randn(V, H)
    restriction = Restriction(Settings(static_core=(0,), capacity=64, buffer_capacity=128), slots=2,
                              vocab_size=V, runner="v1", rows=lambda: HeadRows(weight, V), transform=LogitTransform)
    restriction.admit("a", [100])
    first, second = stage_v1(["a"], torch.tensor([[11, 12]]), None), stage_v1(["a"], torch.tensor([[13, -1]]), None)
    first.event, second.event = RunningCopy(busy=1), RunningCopy(busy=0)
    restriction.stage(first)
    restriction.stage(second)
    restriction.apply_staged()  # the first copy is still running: both wait, in order
    assert restriction.vocab.active["a"] == {0, 100} and restriction.staged == [first, second]
    restriction.apply_staged()  # a step later both have landed
    assert restriction.vocab.active["a"] == {0, 100, 11, 12, 13} and not restriction.staged
    assert restriction.stats.commits == 3

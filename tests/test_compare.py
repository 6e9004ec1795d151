"""compare_runs: the lanes' rounds alternate, the lane that goes first rotates, each lane's clock counts its own."""
from types import SimpleNamespace

from nanospec_core.compare import compare_runs
from nanospec_core.config import GenerationConfig, TreeConfig, VocabConfig
from nanospec_core.metrics import StepStats


class FakeSession:
    """Streams of `rounds` one-token rounds per method, logging which method ran each round."""

    target = SimpleNamespace(device="cpu")

    def __init__(self, rounds: dict[str, int]):
        self.rounds, self.log = rounds, []

    def stream(self, method, prompt_ids, gen, tree, vocab):
        count = self.rounds[method]
        for round_ in range(count + 1):  # round 0: the prefill
            self.log.append(method)
            yield StepStats(round=round_, tokens=[] if round_ == 0 else [round_], accepted=int(round_ > 0),
                            finished=round_ == count)


def run(rounds):
    session = FakeSession(rounds)
    snaps = list(compare_runs(session, None, GenerationConfig(max_new_tokens=8), TreeConfig(), VocabConfig(),
                              methods=tuple(rounds), decode_text=False))
    return session.log, snaps


def test_who_goes_first_rotates_and_snapshots_keep_the_methods_order():
    log, snaps = run({"a": 3, "b": 3, "c": 3})
    firsts = [log[i] for i in range(0, len(log), 3)]
    assert firsts == ["a", "b", "c", "a"]  # alternation k starts with lane k mod 3
    assert sorted(log[3:6]) == ["a", "b", "c"]  # still one round of each per alternation
    assert all([t.method for t in snap.traces] == ["a", "b", "c"] for snap in snaps)
    assert snaps[-1].done and [len(t.token_ids) for t in snaps[-1].traces] == [3, 3, 3]


def test_a_finished_lane_is_skipped_and_the_others_run_to_their_end():
    log, snaps = run({"a": 1, "b": 4})
    assert log.count("a") == 2 and log.count("b") == 5
    assert snaps[-1]["b"].token_ids == [1, 2, 3, 4] and snaps[-1]["a"].finished

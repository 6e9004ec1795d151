"""The runtime choice: dtype and CPU weight layout decided by measurement (injected timings here), cached."""
import json

import pytest
import torch

from nanospec_core.errors import NanoSpecError
from nanospec_core.machine import (BULK_ROWS, PROBE_ROWS, ModelShapes, RuntimeChoice, choose_runtime, decide,
                                   probe_costs, resolve_device)
from tests.conftest import tiny_hf_model

DTYPES, LAYOUTS = ("float32", "bfloat16"), ("row", "column")


def costs(ms: dict, rows=(1, 8)) -> dict:
    """Probe costs from {(dtype, layout): ms}, the same for both parts and every row count."""
    return {f"{d}/{l}/{part}/{n}": value for (d, l), value in ms.items() for part in ("backbone", "lm_head")
            for n in rows}


def test_float32_faster_gives_float32():
    out = decide(costs({("float32", "row"): 50, ("float32", "column"): 60, ("bfloat16", "row"): 90,
                        ("bfloat16", "column"): 95}), DTYPES, LAYOUTS)
    assert out["dtype"] == "float32" and out["backbone_layout"] == out["head_layout"] == "row"
    assert out["runner_up"] == "bfloat16" and out["speedup"] == pytest.approx(90 / 50)


def test_bf16_faster_gives_bf16_with_its_own_fastest_layout():
    out = decide(costs({("float32", "row"): 100, ("float32", "column"): 60, ("bfloat16", "row"): 30,
                        ("bfloat16", "column"): 40}), DTYPES, LAYOUTS)
    assert out["dtype"] == "bfloat16" and out["backbone_layout"] == "row"
    assert out["speedup"] == pytest.approx(60 / 30)  # against float32 in ITS best layout


def test_column_major_wins_only_past_the_margin():
    close = decide(costs({("float32", "row"): 100, ("float32", "column"): 97}), ("float32",), LAYOUTS)
    clear = decide(costs({("float32", "row"): 100, ("float32", "column"): 70}), ("float32",), LAYOUTS)
    assert close["backbone_layout"] == "row" and clear["backbone_layout"] == clear["head_layout"] == "column"


def test_a_near_tie_keeps_float32_for_exactness():
    out = decide(costs({("float32", "row"): 100, ("bfloat16", "row"): 98}), DTYPES, ("row",))
    assert out["dtype"] == "float32" and out["speedup"] < 1
    choice = RuntimeChoice(device="cpu", **out)
    assert "within noise" in choice.describe()


def test_layouts_are_decided_per_part():
    table = costs({("float32", "row"): 100, ("float32", "column"): 100})
    for n in (1, 8):
        table[f"float32/column/lm_head/{n}"] = 40
    out = decide(table, ("float32",), LAYOUTS)
    assert out["backbone_layout"] == "row" and out["head_layout"] == "column"


class CountingProbe:
    def __init__(self, ms):
        self.calls, self.ms = [], ms

    def __call__(self, shapes, device, dtypes, layouts, rows=(1, PROBE_ROWS)):
        self.calls.append(dtypes)
        return costs({(d, l): self.ms[d] + (5 if l == "column" else 0) for d in dtypes for l in layouts}, rows)


def test_the_decision_is_cached_so_a_second_start_does_not_probe(tmp_path):
    config = tiny_hf_model().config
    probe = CountingProbe({"float32": 80, "bfloat16": 32})
    first = choose_runtime(config, device="cpu", dtype="auto", probe=probe, cache=tmp_path / "machine.json")
    assert first.dtype == "bfloat16" and first.source == "measured" and len(probe.calls) == 1
    assert "bf16: measured 2.5x faster than float32 on this CPU" in first.describe()
    again = choose_runtime(config, device="cpu", dtype="auto", probe=probe, cache=tmp_path / "machine.json")
    assert len(probe.calls) == 1 and again.dtype == "bfloat16" and again.source == "cached"
    stored = json.loads((tmp_path / "machine.json").read_text())
    assert len(stored) == 1 and "torch " + torch.__version__ in next(iter(stored))


def test_training_probes_at_bulk_rows_and_keeps_its_own_decision(tmp_path):
    """Decoding times 1 and 8 rows, training and extraction BULK_ROWS: one machine can want bf16 for the first and
    float32 for the second, and the two decisions are cached apart."""
    class RowsProbe(CountingProbe):
        def __call__(self, shapes, device, dtypes, layouts, rows=(1, PROBE_ROWS)):
            self.calls.append(rows)
            faster = "bfloat16" if rows == (1, PROBE_ROWS) else "float32"
            return costs({(d, l): 30 if d == faster else 60 for d in dtypes for l in layouts}, rows)

    config, probe, cache = tiny_hf_model().config, RowsProbe({}), tmp_path / "machine.json"
    decode = choose_runtime(config, device="cpu", dtype="auto", probe=probe, cache=cache)
    bulk = choose_runtime(config, device="cpu", dtype="auto", probe=probe, cache=cache, rows=(BULK_ROWS,))
    assert (decode.dtype, bulk.dtype) == ("bfloat16", "float32") and probe.calls == [(1, PROBE_ROWS), (BULK_ROWS,)]
    again = choose_runtime(config, device="cpu", dtype="auto", probe=probe, cache=cache, rows=(BULK_ROWS,))
    assert again.dtype == "float32" and again.source == "cached" and len(probe.calls) == 2


def test_a_given_dtype_probes_only_its_layouts():
    probe = CountingProbe({"float32": 80, "bfloat16": 32})
    choice = choose_runtime(tiny_hf_model().config, device="cpu", dtype="float32", probe=probe, cache=False)
    assert probe.calls == [("float32",)] and choice.dtype == "float32" and choice.source == "given"
    assert "exact greedy equality" in choice.describe()


def test_the_real_probe_times_every_candidate_on_the_model_shapes():
    shapes = ModelShapes.from_config(tiny_hf_model().config)
    assert shapes.layer[0] == (64, 64) and shapes.layer[-1] == (64, 128) and shapes.lm_head == (4096, 64)
    measured = probe_costs(shapes, "cpu", DTYPES, LAYOUTS, repeats=1)
    assert len(measured) == 2 * 2 * 2 * 2 and all(ms > 0 for ms in measured.values())


def test_devices_resolve_and_a_missing_gpu_is_a_clear_error():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(NanoSpecError, match="unknown device"):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(NanoSpecError, match="no CUDA GPU"):
            resolve_device("cuda")

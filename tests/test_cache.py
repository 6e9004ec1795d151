"""The cache that survives restarts: where it is (NANOSPEC_CACHE, a Space's persistent /data, home), a probe keyed
per CPU model, and a start on a warm cache that converts and probes nothing and says so in one line."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nanospec_core import cache, machine
from nanospec_core.cache import CacheState
from nanospec_core.models import loading
from tests.conftest import tiny_hf_model


def test_nanospec_cache_wins_then_persistent_storage_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOSPEC_CACHE", raising=False)
    monkeypatch.setattr(cache, "PERSISTENT_STORAGE", tmp_path / "absent")
    assert cache.cache_dir() == Path.home() / ".cache" / "nanospec" and "home folder" in cache.cache_place()
    mount = tmp_path / "data"
    mount.mkdir()
    monkeypatch.setattr(cache, "PERSISTENT_STORAGE", mount)
    assert cache.cache_dir() == mount / "nanospec" and cache.cache_place() == "persistent storage"
    assert loading.cache_dir() == mount / "nanospec"  # the conversions and the probe use the same folder
    assert machine._cache_file() == mount / "nanospec" / "machine.json"
    monkeypatch.setenv("NANOSPEC_CACHE", str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine" and cache.cache_place() == "NANOSPEC_CACHE"


def test_the_probe_is_cached_per_cpu_model(tmp_path, monkeypatch):
    """Storage that moves to other hardware keeps its entries, but another CPU model measures again."""
    calls = []

    def probe(shapes, device, dtypes, layouts, rows=(1, machine.PROBE_ROWS)):
        calls.append(device)
        return {f"{d}/{lay}/{part}/{n}": 1.0 for d in dtypes for lay in layouts
                for part in ("backbone", "lm_head") for n in rows}

    config, path = tiny_hf_model().config, tmp_path / "machine.json"
    monkeypatch.setattr(machine, "machine_name", lambda device: "CPU A, 2 threads")
    assert not machine.choose_runtime(config, "cpu", "auto", probe, path).from_cache and len(calls) == 1
    assert machine.choose_runtime(config, "cpu", "auto", probe, path).from_cache and len(calls) == 1
    monkeypatch.setattr(machine, "machine_name", lambda device: "CPU B, 2 threads")
    assert not machine.choose_runtime(config, "cpu", "auto", probe, path).from_cache and len(calls) == 2


def test_the_start_up_line_says_where_and_what_was_warm(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSPEC_CACHE", str(tmp_path))
    warm = CacheState(model_converted=True, probe_cached=True, costs_cached=None)
    assert warm.warm and warm.line() == (f"cache {tmp_path} (NANOSPEC_CACHE): warm (model converted earlier, "
                                         "probe cached)")
    cold = CacheState(model_converted=False, probe_cached=True, costs_cached=False)
    assert not cold.warm and cold.line().endswith("cold (model converted now, probe cached, tree costs measured now)")


@pytest.fixture
def packaged_tiny(tiny_model_dir, tmp_path, monkeypatch):
    """A packaged model whose converted folder is already in NANOSPEC_CACHE (the tiny model), nothing else cached."""
    key = "tiny-packaged"
    model = loading.PackagedModel(key=key, title="tiny", packages=("none",), version="0", part_file="x",
                                  sha256="0" * 64)
    monkeypatch.setitem(loading.PACKAGED, key, model)
    monkeypatch.setenv("NANOSPEC_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_model_dir, tmp_path / "cache" / "models" / key)
    return key


@pytest.fixture
def calibrated_head(tmp_path):
    """A random EAGLE-3 head for the tiny model with an acceptance table: the tree chooser measures cost curves."""
    import numpy as np
    import torch

    from nanospec_core.decoding.tree_choice import save_acceptance
    from nanospec_core.models.eagle import random_head
    from nanospec_core.models.eagle_checkpoint import save_head
    from nanospec_core.models.target import TargetModel

    folder = tmp_path / "head"
    save_head(random_head(TargetModel(tiny_hf_model()), "eagle3", seed=1, tied_lm_head=True), folder,
              dtype=torch.float32)
    save_acceptance(folder, np.zeros((16, 3), dtype=np.int64), {"note": "every draft accepted (made up)"})
    return str(folder)


def test_a_restart_on_a_warm_cache_converts_and_probes_nothing(packaged_tiny, calibrated_head, monkeypatch, capsys):
    from nanospec_core import profiling
    from nanospec_core.views.session_cache import SessionCache

    def refuse(*args, **kwargs):
        raise AssertionError("the packaged model was converted again")

    probes, curves = [], []
    measured, curves_of = machine.probe_costs, profiling.tree_costs
    monkeypatch.setattr(loading, "assemble_parts", refuse)
    monkeypatch.setattr(loading, "convert_gguf", refuse)
    monkeypatch.setattr(machine, "probe_costs", lambda *a, **k: probes.append(1) or measured(*a, **k, repeats=1))
    monkeypatch.setattr(profiling, "tree_costs", lambda *a: curves.append(1) or curves_of(*a))
    SessionCache(packaged_tiny, dtype="auto", head=calibrated_head).get(packaged_tiny)  # the first start measures
    first = capsys.readouterr().out
    assert len(probes) == len(curves) == 1
    assert "cold (model converted earlier, probe measured now, tree costs measured now)" in first
    SessionCache(packaged_tiny, dtype="auto", head=calibrated_head).get(packaged_tiny)  # a restart, a new process
    again = capsys.readouterr().out
    assert len(probes) == 1, "the restart probed the machine again"
    assert len(curves) == 1, "the restart measured the tree's cost curves again"
    line = next(line for line in again.splitlines() if "cache " in line)
    assert line.endswith(f"cache {cache.cache_dir()} (NANOSPEC_CACHE): warm (model converted earlier, probe cached, "
                         "tree costs cached)")

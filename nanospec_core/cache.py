"""Where the once-per-machine work is kept, so that a restart does not redo it.

Three things cost time at a first start and are kept in `cache_dir()`: the packaged model's GGUF -> safetensors
conversion (`models/<key>/`, loading.py), the machine probe (`machine.json`, machine.py) and the draft tree's cost
curves (`tree_costs.json`, `round_overhead.json`, session.py). A Hugging Face Space loses its home folder on every
restart, rebuild or wake; its persistent storage (or a bucket mounted as a volume) appears at /data. So:

    NANOSPEC_CACHE, if set                      (wins: any folder you choose)
    /data/nanospec, if /data is a writable dir  (a Space's persistent storage survives restarts)
    ~/.cache/nanospec                           (elsewhere)

The probe's entries are keyed by CPU model, thread and core count and torch version (machine.py), so a cache that
moves to other hardware with the storage is measured again there, not trusted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PERSISTENT_STORAGE = Path("/data")  # where a Space mounts its persistent storage or a bucket volume


def persistent_storage() -> Path | None:
    """/data when it is a folder this process may write into, else None."""
    mount = PERSISTENT_STORAGE
    return mount if mount.is_dir() and os.access(mount, os.W_OK | os.X_OK) else None


def cache_dir() -> Path:
    """$NANOSPEC_CACHE, else /data/nanospec on persistent storage, else ~/.cache/nanospec."""
    override = os.environ.get("NANOSPEC_CACHE")
    if override:
        return Path(override).expanduser()
    mount = persistent_storage()
    return mount / "nanospec" if mount is not None else Path.home() / ".cache" / "nanospec"


def cache_place() -> str:
    """Why cache_dir() is where it is, in a few words."""
    if os.environ.get("NANOSPEC_CACHE"):
        return "NANOSPEC_CACHE"
    if persistent_storage() is not None:
        return "persistent storage"
    return "home folder; a Space loses it on restart: add persistent storage or set NANOSPEC_CACHE"


@dataclass(frozen=True)
class CacheState:
    """What a start found already done. None: nothing of that kind to do (a local folder needs no conversion;
    ZeroGPU probes nothing at start)."""

    model_converted: bool | None  # the packaged model's safetensors folder was there before this start
    probe_cached: bool | None  # the machine probe's decision came from machine.json
    costs_cached: bool | None  # the draft tree's cost curves came from tree_costs.json

    @property
    def warm(self) -> bool:
        return all(part is not False for part in (self.model_converted, self.probe_cached, self.costs_cached))

    def line(self) -> str:
        """One start-up line: 'cache /data/nanospec (persistent storage): warm (model converted earlier, ...)'."""
        said = {"model": self.model_converted, "probe": self.probe_cached, "tree costs": self.costs_cached}
        done = {"model": ("converted earlier", "converted now"), "probe": ("cached", "measured now"),
                "tree costs": ("cached", "measured now")}
        parts = [f"{name} {done[name][0] if found else done[name][1]}" for name, found in said.items()
                 if found is not None]
        return (f"cache {cache_dir()} ({cache_place()}): {'warm' if self.warm else 'cold'}"
                + (f" ({', '.join(parts)})" if parts else ""))

"""The app's loaded models: one Session per (model, precision), at most `size` kept, loaded on first use.

A public demo may load only the packaged models unless any_model is set (hub ids and local folders download and
fill the disk). A model without a shipped head runs with a random one, and the cache keeps a note for the app to
show next to its results: few drafts are accepted then, and the speedups are not representative.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

from .. import decode_thread
from ..cache import CacheState
from ..errors import NanoSpecError
from ..machine import on_zero_gpu
from ..models.loading import PACKAGED, model_key
from ..paths import shipped_head_dir
from ..session import Session


class SessionCache:
    """Loaded sessions by model name (at most `size`, least recently used dropped), with a head fallback note."""

    def __init__(self, default_model: str = "embedded", dtype: str = "auto", head: str | None = None, size: int = 2,
                 any_model: bool = False):
        self.default_model, self.dtype, self.head, self.size = default_model, dtype, head, size
        by_key: dict[str, str] = {}  # one name per distinct model ('embedded' is qwen2.5-coder-0.5b)
        for name in (default_model, *PACKAGED):
            by_key.setdefault(model_key(name), name)
        self.choices = list(by_key.values())  # what a public demo may load
        self.any_model = any_model  # also hub ids and local folders (downloads, disk: off unless asked for)
        self.sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()  # (model, dtype) -> session
        self.notes: dict[str, str] = {}  # model -> warning shown with its results (random head)
        self.lock = threading.Lock()

    def head_for(self, model: str) -> str | None:
        if model == self.default_model and self.head:
            return self.head
        if (shipped_head_dir(model_key(model)) / "config.json").exists():
            return None
        self.notes[model] = (f"No trained EAGLE head ships for model '{model}': it runs with a RANDOM head, so "
                             "few drafts are accepted and the speedups shown are not representative.")
        return "random"

    @staticmethod
    def cache_state(session: Session, zero_gpu: bool) -> CacheState:
        """What this load found done already: the conversion, the probe, the tree's cost curves (cache.py)."""
        return CacheState(model_converted=session.converted_before,
                          probe_cached=None if zero_gpu else session.runtime.from_cache,
                          costs_cached=None if zero_gpu else session.tree_costs_cached())

    def loaded(self, model: str, dtype: str | None = None) -> bool:
        return (model, dtype or self.dtype) in self.sessions

    def get(self, model: str, dtype: str | None = None) -> Session:
        """The session of `model` in `dtype` ('auto' = measured fastest, 'float32'), loaded on first use; the
        device is auto: CUDA where there is a GPU."""
        dtype = dtype or self.dtype
        with self.lock:
            if (model, dtype) in self.sessions:
                self.sessions.move_to_end((model, dtype))
                return self.sessions[(model, dtype)]
            if not self.any_model and model not in self.choices:
                raise NanoSpecError(f"model '{model}' is not served here: choose {', '.join(self.choices)} "
                                    "(NANOSPEC_ANY_MODEL=1 also allows hub ids and local folders)")
            # Loaded on the decode thread, where its runs will be: a load runs kernels (the probe, the tree's costs),
            # and a second thread that ever ran torch's parallel kernels made the decode thread's forwards ~20%
            # slower here (Xeon AMX, 2 cores: a plain 64-token run 6.05 s against 5.0 s; docs/results.md).
            session = decode_thread.call(self.load, model, dtype)
            self.sessions[(model, dtype)] = session
            while len(self.sessions) > self.size:
                self.sessions.popitem(last=False)
            return session

    def load(self, model: str, dtype: str) -> Session:
        print(f"nanospec app: loading model '{model}' ({dtype}) ...", flush=True)
        started = time.perf_counter()
        session = Session(model, dtype=dtype, device="auto", head=self.head_for(model))
        session.head  # load the draft head now: a bad head fails here, not mid-run
        print(f"nanospec app: {session.runtime.describe()}", flush=True)
        zero_gpu = on_zero_gpu()  # nothing is probed or measured at start there
        print(f"nanospec app: {self.cache_state(session, zero_gpu).line()}", flush=True)
        if not zero_gpu:  # measuring the tree runs kernels: on ZeroGPU only inside @spaces.GPU calls
            choice = session.tree_choice()
            print(f"nanospec app: tree {vars(choice.tree)} ({choice.reason})", flush=True)
        print(f"nanospec app: '{model}' ready in {time.perf_counter() - started:.1f} s", flush=True)
        return session

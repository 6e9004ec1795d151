"""One long-lived thread for every model call a server makes, so each forward finds the same warm thread team.

A web server runs a streaming handler's steps on whatever worker thread is free (Gradio calls a sync generator's
`next()` through anyio's thread pool). Torch's CPU kernels parallelise with OpenMP, and an OpenMP thread team belongs
to the thread that starts the parallel region: a step that lands on a new worker builds a new team, the old teams'
threads spin-wait for a while after their last region, and on a 2-core machine those spinning threads take cores
from the forward that runs now. Routing every step through one thread keeps one team, warmed up once.

    for snap in on_decode_thread(compare_runs(session, ids, gen)):
        render(snap)   # runs in the caller's thread while decoding is paused: the two never share the cores

The caller blocks while a step runs (it waits on a future, it does not spin), and the generator is closed on the
decode thread too, where its caches were made.
"""
from __future__ import annotations

import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()
_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanospec-decode")
_IDENT: list[int] = []  # the decode thread's id, once it has run something


def _mark() -> None:
    if not _IDENT:
        _IDENT.append(threading.get_ident())


def call(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on the decode thread, in the caller's context variables (a server's request and progress
    objects live there); its result or its exception here. From the decode thread itself it runs inline (a wait on
    itself would never end)."""
    if _IDENT and threading.get_ident() == _IDENT[0]:
        return fn(*args, **kwargs)

    def job():
        _mark()
        return fn(*args, **kwargs)

    return _EXECUTOR.submit(contextvars.copy_context().run, job).result()


def on_decode_thread(iterator: Iterator[T]) -> Iterator[T]:
    """Yield `iterator`'s items, each produced by a next() on the decode thread; closing this closes it there."""
    try:
        while True:
            item = call(next, iterator, _DONE)
            if item is _DONE:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            call(close)


def thread_id() -> int | None:
    """The decode thread's id (None before its first call): what the tests check every step ran on."""
    return _IDENT[0] if _IDENT else None

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

import asyncio
import contextvars
import threading
import time
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


async def _one_pass() -> None:
    await asyncio.sleep(0)


def let_server_send(passes: int = 3) -> float | None:
    """Hold the next round until the server's event loop has run what was queued before now.

    Gradio runs a sync generator's next() in an anyio worker thread and, as soon as an update is yielded, queues it
    and calls next() again; the event loop then serialises the update (json of every figure) and writes it while the
    next round runs. That json holds the GIL and a core: on a 2-core machine the round that follows an update (the
    plain lane's, the first of each alternation) was the slow one. Each pass schedules a no-op on the loop and waits
    for it; the loop runs callbacks in order, so the send queued before it has gone by then (a few passes cover the
    send's own awaits). Returns the seconds it waited; None outside an anyio worker thread (CLI, benchmark, tests
    without a server), where there is no loop to wait for.
    """
    from anyio import from_thread  # gradio's own dependency: only a server gets here with work to wait for

    start = time.perf_counter()
    try:
        for _ in range(passes):
            from_thread.run(_one_pass)
    except RuntimeError:  # "can only be run from an AnyIO worker thread"
        return None
    return time.perf_counter() - start

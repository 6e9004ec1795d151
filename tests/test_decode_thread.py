"""decode_thread: every step of a wrapped generator runs on one long-lived thread, whoever calls next()."""
from __future__ import annotations

import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanospec_core import decode_thread
from nanospec_core.decode_thread import call, on_decode_thread


def steps(record: list, closed: list, count: int = 6):
    try:
        for i in range(count):
            record.append(threading.get_ident())
            yield i
    finally:
        closed.append(threading.get_ident())


def test_steps_run_on_one_thread_whatever_thread_asks():
    record, closed = [], []
    wrapped = on_decode_thread(steps(record, closed))
    with ThreadPoolExecutor(max_workers=4) as pool:  # like anyio's workers: each next() may come from another
        items = [pool.submit(next, wrapped).result() for _ in range(6)]
        callers = {pool.submit(threading.get_ident).result() for _ in range(8)}
    assert items == list(range(6))
    assert len(set(record)) == 1 and record[0] == decode_thread.thread_id()
    assert record[0] not in callers | {threading.get_ident()}
    assert list(wrapped) == [] and closed == [record[0]]


def test_closing_early_closes_the_inner_generator_on_the_decode_thread():
    record, closed = [], []
    wrapped = on_decode_thread(steps(record, closed))
    assert next(wrapped) == 0
    wrapped.close()
    assert closed == [decode_thread.thread_id()] and len(record) == 1


def test_errors_and_context_variables_cross_over():
    def failing():
        yield 1
        raise ValueError("bad step")

    wrapped = on_decode_thread(failing())
    assert next(wrapped) == 1
    with pytest.raises(ValueError, match="bad step"):
        next(wrapped)
    request = contextvars.ContextVar("request", default=None)
    request.set("visitor")
    assert call(request.get) == "visitor"


def test_a_call_from_the_decode_thread_runs_inline():
    assert call(lambda: call(threading.get_ident)) == decode_thread.thread_id()


def test_let_server_send_waits_for_the_send_the_loop_had_queued():
    """In an anyio worker thread (where Gradio runs a sync generator) the next round waits until the event loop has
    run a send queued before it, even one that takes a few awaits; outside a worker it returns None at once."""
    import asyncio

    import anyio

    from nanospec_core.decode_thread import let_server_send

    sent: list[str] = []

    async def send():  # like the server's stream writer: json, then a couple of awaits until the bytes are out
        for _ in range(2):
            await asyncio.sleep(0)
        sent.append("update")

    def handler():
        anyio.from_thread.run_sync(lambda: asyncio.get_running_loop().create_task(send()))  # the update is queued
        waited = let_server_send()
        return list(sent), waited

    async def main():
        return await anyio.to_thread.run_sync(handler)

    seen, waited = anyio.run(main)
    assert seen == ["update"] and waited is not None and waited >= 0
    assert let_server_send() is None  # no server loop here

"""The one bridge from a blocking runtime to the event loop.

Every local plugin returns a plain (blocking) iterator from ``llmpool_stream``; the
daemon drives it here, on a thread of its own, and hands items to the event loop as
they come. Cancelling the consumer stops the producer within one item.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any, TypeVar

from llmpoold.types import CancelToken

T = TypeVar("T")

_DONE = object()


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def iterate_in_thread(
    make_iterator: Callable[[], Iterator[T]], *, cancel: CancelToken, name: str = "llmpool-stream"
) -> AsyncGenerator[T, None]:
    """Yield the items of a blocking iterator built and driven on a dedicated thread.

    The thread pulls one item at a time and checks ``cancel`` between items; when the
    consumer stops early (break, ``aclose()``, task cancellation) ``cancel`` is set and
    the thread closes the iterator after the item it is producing, so the runtime
    stops within one token; closing waits for that, so once this iterator is closed
    the runtime is free. Exceptions from the iterator are re-raised here.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    finished: asyncio.Future[None] = loop.create_future()

    def mark_finished() -> None:
        if not finished.done():
            finished.set_result(None)

    def deliver(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # loop closed: nobody is listening any more
            cancel.set()

    def produce() -> None:
        iterator: Iterator[T] | None = None
        try:
            iterator = make_iterator()
            for item in iterator:
                if cancel.is_set():
                    break
                deliver(item)
                if cancel.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            deliver(_Failure(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:  # noqa: BLE001
                    deliver(_Failure(exc))
            deliver(_DONE)
            try:
                loop.call_soon_threadsafe(mark_finished)
            except RuntimeError:
                pass

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        cancel.set()
        # Wait for the producer to let go of the runtime (at most the token it is
        # computing), so the replica's next request never overlaps this one.
        await asyncio.shield(finished)


async def run_blocking(func: Callable[..., T], *args: Any) -> T:
    """Run a blocking call (load, unload, estimate) on the default thread pool."""
    return await asyncio.get_running_loop().run_in_executor(None, func, *args)

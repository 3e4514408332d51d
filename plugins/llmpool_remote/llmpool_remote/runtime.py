"""One replica of a remote model: :class:`RemoteRuntime` holds the validated options
and an aiohttp ``ClientSession`` created lazily on the event loop that uses it
(``llmpool_load`` runs on a worker thread, which has no loop of its own)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import structlog

from llmpool_remote.options import RemoteOptions
from llmpoold.errors import BackendError

if TYPE_CHECKING:
    import aiohttp

log = structlog.get_logger("llmpool_remote")


class RemoteRuntime:
    """One replica: config plus an aiohttp session bound to the loop that uses it."""

    def __init__(self, replica_id: str, model_name: str, options: RemoteOptions) -> None:
        self.replica_id = replica_id
        self.model_name = model_name
        self.options = options
        self.closed = False
        self._lock = threading.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned: set[str] = set()
        self._keepers: list[AsyncIterator[None]] = []

    # The session -----------------------------------------------------------------------

    async def session(self) -> aiohttp.ClientSession:
        """The session for the running loop, created on first use (or anew when the
        previous loop went away, as with ``asyncio.run`` per call in hook-level tests)."""
        import aiohttp

        loop = asyncio.get_running_loop()
        with self._lock:
            if self.closed:
                raise BackendError(503, "replica_unloaded", f"replica '{self.replica_id}' was unloaded")
            current = self._session
            if current is not None and self._loop is loop and not current.closed:
                return current
            if current is not None and self._loop is not None:
                _close_session(current, self._loop, wait=False)
            # Each call passes its own timeout with the total left to its deadline.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.options.remote_timeout_s,
                                            sock_read=self.options.remote_timeout_s)
            session = aiohttp.ClientSession(timeout=timeout, raise_for_status=False,
                                            headers={"Accept": "application/json"})
            self._session, self._loop = session, loop
        # The loop closes parked async generators when it shuts down (asyncio.run does):
        # park one that closes the session then, so no connection outlives its loop.
        keeper = _close_on_loop_shutdown(session)
        await keeper.__anext__()
        self._keepers.append(keeper)
        return session

    def close(self) -> None:
        with self._lock:
            self.closed = True
            session, loop, self._session, self._loop = self._session, self._loop, None, None
        if session is not None and loop is not None:
            _close_session(session, loop, wait=True)

    # Helpers ---------------------------------------------------------------------------

    def api_key(self) -> str:
        key = os.environ.get(self.options.remote_api_key_env, "")
        if not key:
            raise BackendError(500, "missing_api_key_env",
                               f"missing API key environment variable: {self.options.remote_api_key_env}")
        return key

    def warn_ignored(self, ignored: dict[str, Any]) -> None:
        fresh = {k: v for k, v in ignored.items() if k not in self._warned}
        if fresh:
            self._warned.update(fresh)
            log.warning("remote_unsupported_decoding", ignored=fresh, model=self.model_name)


async def _close_on_loop_shutdown(session: aiohttp.ClientSession) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await session.close()


def _close_session(session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop, *, wait: bool) -> None:
    """Close ``session`` from any thread: on its own loop when that loop still runs,
    synchronously (transports only) when the loop is closed."""
    if session.closed:
        return
    if loop.is_closed() or not loop.is_running():
        connector = session.connector
        if connector is not None:
            # The loop is gone: close transports without scheduling anything on it.
            connector._close()
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.create_task(session.close())
        return
    future = asyncio.run_coroutine_threadsafe(session.close(), loop)
    if wait:
        try:
            future.result(timeout=10)
        except Exception as exc:  # noqa: BLE001 - unload is best effort
            log.warning("remote_session_close_failed", error=type(exc).__name__)

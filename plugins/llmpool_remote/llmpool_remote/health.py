"""``remote_health_check: "models"``: at load, the upstream must list ``remote_model``."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from llmpool_remote.runtime import RemoteRuntime
from llmpool_remote.transport import Deadline, open_upstream, read_whole
from llmpoold.errors import BackendError, LoadError


def health_check(runtime: RemoteRuntime) -> None:
    """``GET <base>/models`` must answer (within ``remote_total_timeout_s``) and list
    ``remote_model``. Raises LoadError. Blocking (its own short-lived loop); closes the
    runtime's session when done."""

    async def check() -> None:
        deadline = Deadline.start(runtime.options)
        try:
            response, _ = await open_upstream(runtime, None, None, deadline, path="/models", method="GET",
                                              what="model list")
            data = await read_whole(response, runtime, deadline, what="model list")
        except BackendError as exc:
            raise LoadError(f"health check GET {runtime.options.remote_base_url}/models failed: "
                            f"{exc.code}: {exc.message}") from None
        finally:
            session, runtime._session = runtime._session, None
            runtime.closed = True
            if session is not None:
                await session.close()
        listed = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)] if isinstance(data, dict) else []
        if runtime.options.remote_model not in listed:
            raise LoadError(f"health check: upstream {runtime.options.remote_base_url}/models does not list "
                            f"remote_model '{runtime.options.remote_model}' (listed: {listed[:20]})")

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(check())
        return
    with ThreadPoolExecutor(1) as pool:  # called on a loop thread: check on a thread of its own
        pool.submit(asyncio.run, check()).result()

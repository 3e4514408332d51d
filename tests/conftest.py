"""Fixtures for the daemon's tests: an app with the echo test backend."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import echo_backend  # noqa: E402

from llmpoold.http.app import create_app  # noqa: E402
from llmpoold.testing import make_registry, settings_from  # noqa: E402


@pytest.fixture
def echo_settings() -> dict[str, Any]:
    return {"engine": {"backend": "echo", "models": {
        "echo": {"enabled": True},
        "slow": {"enabled": True, "echo_delay_s": 0.05},
        "off": {"enabled": False},
    }}}


@pytest.fixture
def make_client(aiohttp_client: Any):
    """``await make_client(settings_dict)`` → a test client; startup loads finish first."""

    async def factory(settings: dict[str, Any], **kwargs: Any) -> Any:
        app = create_app(settings_from(settings), make_registry(echo_backend), **kwargs)
        client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
        from llmpoold.http.keys import POOL

        await app[POOL].startup_done.wait()
        return client

    return factory


@pytest.fixture
async def client(make_client: Any, echo_settings: dict[str, Any]) -> Any:
    return await make_client(echo_settings)

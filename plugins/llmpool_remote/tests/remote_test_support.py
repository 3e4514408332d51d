"""Shared constants and helpers of the remote plugin's tests (imported by name, once)."""

from __future__ import annotations

import secrets
import socket
from typing import Any

KEY_ENV = "LLMPOOL_REMOTE_TEST_KEY"
KEY = "sk-llmpool-test-" + secrets.token_hex(12)
LLAMA_MODEL = "gemma3-270m"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def remote_entry(base_url: str, model: str, **keys: Any) -> dict[str, Any]:
    """An ``engine.models`` entry for the ``openai_compatible`` backend."""
    return {"backend": "openai_compatible", "remote_api_kind": "chat_completions", "remote_base_url": base_url,
            "remote_api_key_env": KEY_ENV, "remote_model": model, **keys}



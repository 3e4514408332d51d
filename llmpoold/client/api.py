"""A small synchronous HTTP client for the daemon's API (stdlib only).

Every failure becomes one of two exceptions: :class:`NotRunning` (nothing answers at the
URL) or :class:`DaemonError` (the daemon answered with an error: its status, ``code``
and ``message``, from the seed envelope or OpenAI's error shape). Proxies are not used:
the daemon is normally on loopback.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8010"


class NotRunning(Exception):
    """Nothing answers at the daemon's URL."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"no llmpoold at {url} ({reason}); start it with `llmpoold` or set --url / LLMPOOL_URL")


class DaemonError(Exception):
    """The daemon answered an error status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def error_from_body(status: int, raw: bytes) -> DaemonError:
    """The daemon's error from an answer body of either shape (or the raw text)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return DaemonError(status, "http_error", raw.decode("utf-8", "replace")[:200] or "no body")
    detail = body.get("detail", body.get("error")) if isinstance(body, dict) else None
    if isinstance(detail, list):  # the seed's 422 validation list
        text = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
        return DaemonError(status, "invalid_request_body", text)
    if isinstance(detail, dict):
        code = str(detail.get("code") or detail.get("type") or "error")
        model = detail.get("model")
        message = str(detail.get("message") or code.replace("_", " "))
        if model and f"'{model}'" not in message:
            message = f"{message} '{model}'" if not detail.get("message") else f"{message} (model '{model}')"
        return DaemonError(status, code, str(message))
    return DaemonError(status, "http_error", json.dumps(body)[:200])


@dataclass
class SseEvent:
    event: str | None
    data: Any


class Client:
    """Calls to one daemon with the keys from the environment."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, admin_key: str | None = None,
                 timeout: float = 600.0) -> None:
        self.url = (url or os.environ.get("LLMPOOL_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("LLMPOOL_API_KEY") or None
        self.admin_key = admin_key if admin_key is not None else os.environ.get("LLMPOOL_ADMIN_KEY") or None
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _open(self, method: str, path: str, body: Any = None, *, admin: bool = False) -> Any:
        headers = {"Accept": "application/json"}
        key = self.admin_key if admin else (self.api_key or self.admin_key)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            return self._opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                raise error_from_body(exc.code, exc.read()) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
            raise NotRunning(self.url, str(text).lower()) from None
        except TimeoutError:
            raise DaemonError(504, "client_timeout", f"no answer within {self.timeout:g}s (--timeout)") from None
        except ConnectionError as exc:
            raise NotRunning(self.url, str(exc) or type(exc).__name__) from None

    def json(self, method: str, path: str, body: Any = None, *, admin: bool = False) -> Any:
        with self._open(method, path, body, admin=admin) as resp:
            return json.loads(resp.read())

    def text(self, path: str) -> str:
        with self._open("GET", path) as resp:
            return str(resp.read().decode())

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[SseEvent]:
        """POST ``body`` with ``stream: true`` and yield its server-sent events as they come."""
        with self._open("POST", path, {**body, "stream": True}) as resp:
            try:
                yield from _events(resp)
            except TimeoutError:
                raise DaemonError(504, "client_timeout", f"no event within {self.timeout:g}s (--timeout)") from None
            except (ConnectionError, http.client.IncompleteRead) as exc:
                raise DaemonError(502, "connection_lost", f"the daemon closed the stream: {exc}") from None

    # ----- the calls the CLI makes --------------------------------------------------------

    def admin_models(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/v1/admin/models", admin=True)["models"])

    def admin_model(self, name: str) -> dict[str, Any]:
        for model in self.admin_models():
            if model["name"] == name:
                return model
        raise DaemonError(404, "unknown_model", f"no model '{name}' is configured")

    def load(self, name: str, fields: dict[str, Any]) -> dict[str, Any]:
        return dict(self.json("POST", f"/v1/admin/models/{_quote(name)}/load", fields or None, admin=True))

    def unload(self, name: str) -> dict[str, Any]:
        return dict(self.json("POST", f"/v1/admin/models/{_quote(name)}/unload", admin=True))

    def reload(self) -> dict[str, Any]:
        return dict(self.json("POST", "/v1/admin/settings/reload", admin=True))


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _events(resp: Any) -> Iterator[SseEvent]:
    event: str | None = None
    data: list[str] = []
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            text = "\n".join(data)
            yield SseEvent(event, text if text == "[DONE]" else json.loads(text))
            event, data = None, []

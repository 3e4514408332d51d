"""The seed's mapping of upstream failures to :class:`~llmpoold.errors.BackendError`
(status, code, message). ``what`` names the operation (``chat completion``, ``file
upload``...); messages never carry the API key (:func:`scrub`)."""

from __future__ import annotations

import json

from llmpoold.errors import BackendError

CHAT = "chat completion"
DETAIL_LIMIT = 500


def scrub(text: str, key: str | None) -> str:
    return text.replace(key, "[redacted]") if key else text


def error_detail(raw: str) -> str:
    """The upstream's error message: ``error.message``, else ``message`` / ``detail`` /
    ``error`` strings, else the JSON or raw body; at most 500 characters."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw.strip()[:DETAIL_LIMIT]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:DETAIL_LIMIT]
        for name in ("message", "detail", "error"):
            if isinstance(data.get(name), str):
                return data[name][:DETAIL_LIMIT]
    return json.dumps(data)[:DETAIL_LIMIT]


def http_error(status: int, detail: str, *, retry_after: str | None = None, what: str = CHAT) -> BackendError:
    """The seed's mapping of an upstream HTTP error status (``what``: the operation)."""
    what = f"upstream {what}"
    if status in (401, 403):
        return BackendError(502, "upstream_authentication_failure",
                            f"{what} authentication failed with HTTP {status}: {detail}")
    if status == 429:
        return BackendError(429, "upstream_rate_limit", f"{what} was rate limited with HTTP 429: {detail}",
                            headers={"Retry-After": retry_after} if retry_after else None)
    if 400 <= status < 500:
        return BackendError(502, "upstream_invalid_request",
                            f"{what} rejected the request with HTTP {status}: {detail}")
    if status >= 500:
        return BackendError(502, "upstream_server_error", f"{what} failed with HTTP {status}: {detail}")
    return BackendError(502, "upstream_http_error", f"{what} returned HTTP {status}: {detail}")


def redirect_error(status: int, location: str, what: str = CHAT) -> BackendError:
    """Redirects are never followed (the request, its key and its prompt would go
    wherever the upstream points)."""
    target = f" to {location[:200]}" if location else ""
    return BackendError(502, "upstream_redirect",
                        f"upstream {what} answered with a redirect (HTTP {status}){target}; redirects are not "
                        "followed: set remote_base_url to the final address")


def timeout_error(what: str = CHAT, *, total_s: float | None = None) -> BackendError:
    """504; ``total_s`` when the call's total deadline (``remote_total_timeout_s``) passed."""
    if total_s is not None:
        return BackendError(504, "upstream_timeout",
                            f"upstream {what} did not finish within remote_total_timeout_s ({total_s:g} s)")
    return BackendError(504, "upstream_timeout", f"upstream {what} timed out")


def too_large_error(limit: int, setting: str, what: str = CHAT, *, part: str = "a response body") -> BackendError:
    return BackendError(502, "upstream_response_too_large",
                        f"upstream {what} sent {part} larger than {setting} ({limit} bytes)")


def connection_error(exc: BaseException, what: str = CHAT) -> BackendError:
    return BackendError(502, "upstream_connection_error",
                        f"upstream {what} connection failed: {type(exc).__name__}: {exc}")


def parse_error(message: str, what: str = CHAT) -> BackendError:
    return BackendError(502, "upstream_response_parse_failure", f"upstream {what} {message}")

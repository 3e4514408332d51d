"""The one error type that reaches a client, and the exceptions plugins raise.

Every failure a client can see is an :class:`ApiError`: an HTTP status, a stable
``code`` and a human ``message``. The HTTP layer renders it as the seed's envelope
``{"detail": {"code", "model", "message"}}``; nothing else becomes a response body.
"""

from __future__ import annotations

from typing import Any

QUOTE_CHARS = 200  # the most of any client-supplied string an error body or log line repeats


def clip(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``value`` quoted for an error message or a log line: ``repr``-style (control
    characters and lone surrogates escaped) and cut to about ``limit`` characters, so a
    client's 1 MB string is never echoed back or logged whole."""
    text = value if isinstance(value, str) else str(value)
    quoted = repr(text[:limit])
    return quoted if len(text) <= limit else f"{quoted}... ({len(text)} characters)"



class ApiError(Exception):
    """An error with an HTTP status and a stable code, safe to show to a client."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str | None = None,
        *,
        model: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        param: str | None = None,
    ) -> None:
        """``param``: the request field at fault, for OpenAI's error shape (the seed's
        envelope does not carry it)."""
        super().__init__(message or code)
        self.status = status
        self.code = code
        self.message = message
        self.model = model
        self.headers = headers or {}
        self.extra = extra or {}
        self.param = param

    def detail(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code}
        if self.model is not None:
            body["model"] = self.model
        if self.message is not None:
            body["message"] = self.message
        body.update(self.extra)
        return body

    def with_model(self, model: str) -> ApiError:
        if self.model is None:
            self.model = model
        return self


class BackendError(ApiError):
    """Raised by a plugin while generating, for failures with a known meaning
    (e.g. ``BackendError(504, "upstream_timeout", "upstream chat completion timed out")``).

    Any other exception from a plugin is reported as 500 ``backend_error`` saying
    "internal error" with the request id; the daemon's log has the exception.
    """


class LoadError(Exception):
    """Raised by a plugin's load hook with a message an operator can act on
    (it becomes the model's ``last_error``)."""


class WorkerError(Exception):
    """An exception a plugin raised in a worker process, as the daemon sees it:
    ``type_name`` is the original class name, ``str()`` its message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


def describe(exc: BaseException) -> str:
    """``Type: message`` (or ``Type``) for a plugin failure, wherever it ran."""
    name = exc.type_name if isinstance(exc, WorkerError) else type(exc).__name__
    return f"{name}: {exc}" if str(exc) else name


def load_error_text(exc: BaseException) -> str:
    """A load failure's message, or its class name when it has none (the seed's rule)."""
    return str(exc).strip() or (exc.type_name if isinstance(exc, WorkerError) else type(exc).__name__)


def cut(text: str, limit: int = 2 * QUOTE_CHARS) -> str:
    """``text`` (a message that may embed client input) cut to about ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def internal_error(request_id: str, *, code: str = "internal_error", model: str | None = None) -> ApiError:
    """A 500 that tells the client nothing internal: the request id to quote to the
    operator, whose log line for that id has the traceback."""
    return ApiError(500, code, f"internal error (request id {request_id})", model=model)


STATE_MESSAGES = {
    "model_not_loaded": "model '{model}' is not loaded; load it first",
    "model_loading": "model '{model}' is loading; retry when it is loaded",
    "model_unloading": "model '{model}' is unloading",
    "model_failed": "model '{model}' failed to load; see last_error in /v1/admin/models",
}


def model_state_error(model: str, state: str) -> ApiError:
    """409 for a model that exists but cannot take requests (or this admin call) in its
    current state; the seed's code, with a message saying what to do."""
    code = {
        "unloaded": "model_not_loaded",
        "loading": "model_loading",
        "unloading": "model_unloading",
        "failed": "model_failed",
    }.get(state, "model_not_loaded")
    return ApiError(409, code, STATE_MESSAGES[code].format(model=model), model=model)


def unknown_model(model: str) -> ApiError:
    return ApiError(404, "unknown_model", model=model if len(model) <= QUOTE_CHARS else clip(model))


class SettingsError(ValueError):
    """An invalid settings file; the message names the file, field path and value (never
    the value of a secret or unknown key)."""

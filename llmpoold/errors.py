"""The one error type that reaches a client, and the exceptions plugins raise.

Every failure a client can see is an :class:`ApiError`: an HTTP status, a stable
``code`` and a human ``message``. The HTTP layer renders it as the seed's envelope
``{"detail": {"code", "model", "message"}}``; nothing else becomes a response body.
"""

from __future__ import annotations

from typing import Any


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
    ) -> None:
        super().__init__(message or code)
        self.status = status
        self.code = code
        self.message = message
        self.model = model
        self.headers = headers or {}
        self.extra = extra or {}

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

    Any other exception from a plugin is reported as 500 ``backend_error`` with the
    exception's message.
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


def model_state_error(model: str, state: str) -> ApiError:
    """409 for a model that exists but cannot take requests in its current state."""
    code = {
        "unloaded": "model_not_loaded",
        "loading": "model_loading",
        "unloading": "model_unloading",
        "failed": "model_failed",
    }.get(state, "model_not_loaded")
    return ApiError(409, code, model=model)


def unknown_model(model: str) -> ApiError:
    return ApiError(404, "unknown_model", model=model)


class SettingsError(ValueError):
    """An invalid settings file; the message names the file, field path and value (never
    the value of a secret or unknown key)."""

"""The web console: ``GET /`` and its static files under ``/ui/``.

The page is static (``static/console.html``, ``console.js``, ``console.css``, shipped
in the package; no build step, no CDN). It carries no data: its script reads
``/v1/admin/models``, ``/metrics`` and ``/readyz`` and posts load/unload and
``/v1/responses`` through the API with the keys typed into the page (kept in
``sessionStorage``), so the console has exactly the access its keys give.

``GET /`` answers the page to a client that accepts HTML, and a small JSON index of
the daemon's pages to others (``curl``).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from llmpoold import __version__

STATIC = Path(__file__).parent / "static"
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def _wants_html(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "text/html" in accept or "application/xhtml+xml" in accept


async def index(request: web.Request) -> web.Response:
    if not _wants_html(request):
        return web.json_response({"service": "llmpoold", "version": __version__, "console": "/",
                                  "docs": "/docs", "openapi": "/openapi.json"})
    response = web.Response(text=(STATIC / "console.html").read_text(encoding="utf-8"), content_type="text/html")
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def setup(app: web.Application) -> None:
    """Add ``GET /`` and the static assets ``/ui/{console.js,console.css}`` (public, read-only)."""
    app.router.add_get("/", index)
    app.router.add_static("/ui/", STATIC, show_index=False, follow_symlinks=False)

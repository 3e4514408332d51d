"""The read-only pages that need no key: the console, its assets, the API docs.

Everything these pages show they fetch through the API with the caller's keys; the
pages themselves carry no data. Only GET and HEAD are public.
"""

from __future__ import annotations

PAGES = frozenset({"/", "/docs", "/openapi.json"})
ASSET_PREFIXES = ("/ui/", "/docs/assets/")


def is_public(method: str, path: str) -> bool:
    """True for a GET/HEAD of a page or a static asset (served without a key)."""
    return method in ("GET", "HEAD") and (path in PAGES or path.startswith(ASSET_PREFIXES))

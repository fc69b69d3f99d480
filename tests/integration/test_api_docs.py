"""What the API says about itself, against the API as a process: the OpenAPI document
(written summaries, tag descriptions, examples for every JSON request body and the main
responses), the stream's AsyncAPI document, the HTTP metrics per route template, and
/docs and /redoc rendered by headless Chromium with every request off the API's own
host blocked (their assets come from the API, not a CDN)."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from playwright.async_api import Route, async_playwright

from fleetline import __version__
from tests.integration.test_api import client
from tests.support import ApiProcess

pytestmark = pytest.mark.integration

# Debian's Chromium, as the dashboard's tests drive it (no browser download).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]

REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
# Responses whose schemas carry examples (the main ones of the API).
EXAMPLE_RESPONSES = {
    "DevicePublic", "DeviceCreated", "DevicePage", "Latest", "PointPage", "TwinPublic",
    "MethodResult", "LimitsPublic", "ApiKeyPublic", "ApiKeyCreated", "ApiKeyList",
}


def _generated(operation: dict[str, Any]) -> str:
    """The summary FastAPI would make from the function's name."""
    return str(operation["operationId"].split("-", 1)[-1].replace("_", " ").title())


def _has_examples(doc: dict[str, Any], schema: dict[str, Any]) -> bool:
    """The schema, or each alternative of it, carries examples."""
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "examples" in schema:
        return True
    alternatives = [s for s in schema.get("anyOf", schema.get("oneOf", []))
                    if s.get("type") != "null"]
    return bool(alternatives) and all(_has_examples(doc, s) for s in alternatives)


async def test_openapi_has_summaries_tag_descriptions_and_examples(api: ApiProcess) -> None:
    with client(api) as http:
        doc = http.get("/openapi.json").json()
    operations = [(method.upper(), path, op) for path, ops in doc["paths"].items()
                  for method, op in ops.items()]
    assert len(operations) > 90
    generated = [(m, p) for m, p, op in operations
                 if not op.get("summary") or op["summary"] == _generated(op)]
    assert generated == []
    described = {t["name"]: t.get("description", "") for t in doc["tags"]}
    used = {tag for _, _, op in operations for tag in op.get("tags", [])}
    assert used <= set(described) and all(described[t] for t in used)
    assert "/v1/stream/asyncapi.json" in doc["info"]["description"]
    assert "/v1/stream/asyncapi.json" in described["stream"]
    without = []
    bodies = 0
    for method, path, op in operations:
        for media, content in op.get("requestBody", {}).get("content", {}).items():
            if media == "application/octet-stream":
                continue  # raw bytes of a part (Content-Range), no JSON to show
            bodies += 1
            if "examples" not in content and not _has_examples(doc, content["schema"]):
                without.append((method, path, media))
    assert bodies >= 25 and without == []
    schemas = doc["components"]["schemas"]
    assert {n for n in EXAMPLE_RESPONSES if "examples" not in schemas[n]} == set()
    # The examples are valid for their own schemas (schemathesis sends them, too).
    for schema in schemas.values():
        for example in schema.get("examples", []):
            jsonschema.validate(example, {**schema, "components": doc["components"]},
                                cls=jsonschema.Draft202012Validator)


async def test_the_streams_asyncapi_document_describes_its_messages_and_close_codes(
    api: ApiProcess,
) -> None:
    with client(api) as http:
        resp = http.get("/v1/stream/asyncapi.json")
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["asyncapi"] == "3.0.0" and doc["info"]["version"] == __version__
    assert doc["servers"]["api"]["host"] == urllib.parse.urlsplit(api.url).netloc
    channel = doc["channels"]["stream"]
    assert channel["address"] == "/v1/stream"
    assert set(channel["bindings"]["ws"]["query"]["properties"]) == {
        "device", "tag", "metric", "events"}
    messages = channel["messages"]
    assert set(messages) == {"subscribed", "telemetry", "status", "alarm", "file"}
    for code in (4401, 4403, 1008, 1011, 1013):
        assert f"`{code}`" in channel["description"]
    for name, message in messages.items():
        assert message["payload"]["properties"]["type"] == {"const": name}
        assert message["examples"]
        for example in message["examples"]:
            jsonschema.validate(example["payload"],
                                {**message["payload"], "components": doc["components"]})
    assert [m["$ref"] for m in doc["operations"]["sendEvents"]["messages"]] == [
        f"#/channels/stream/messages/{name}" for name in messages]
    assert {"AlarmPublic", "DeviceFile"} <= set(doc["components"]["schemas"])


async def test_request_metrics_count_route_templates(
    api: ApiProcess, make_key: Callable[..., Any]
) -> None:
    missing = "metrics-no-such-device-7f3a"
    with client(api, await make_key("devices:read")) as http:
        for _ in range(3):
            assert http.get(f"/v1/devices/{missing}").status_code == 404
        assert http.get("/v1/no-such-route").status_code == 404
    status, text = api._get("/metrics", api.metrics_port)
    assert status == 200
    line = re.search(r'^fleetline_api_http_requests_total\{method="GET",'
                     r'route="/v1/devices/\{device_id\}",status="404"\} (\S+)$', text, re.M)
    assert line is not None and float(line[1]) >= 3
    assert re.search(r'^fleetline_api_http_requests_total\{method="GET",route="unmatched",'
                     r'status="404"\} ', text, re.M)
    assert missing not in text and "no-such-route" not in text
    buckets = [line for line in text.splitlines()
               if line.startswith("fleetline_api_http_request_duration_seconds_bucket{")
               and 'route="/v1/devices/{device_id}"' in line and 'method="GET"' in line]
    assert len(buckets) >= 10 and any('le="+Inf"' in line for line in buckets)
    assert re.search(r"^fleetline_api_http_requests_in_flight \S+$", text, re.M)
    build = re.search(r'^fleetline_api_build_info\{(.*)\} 1.0$', text, re.M)
    assert build is not None and f'version="{__version__}"' in build[1]
    assert 'python="3.' in build[1]


async def test_docs_and_redoc_render_with_the_network_blocked(
    api: ApiProcess, artifacts: Path
) -> None:
    own = urllib.parse.urlsplit(api.url).netloc
    blocked: list[str] = []

    async def only_own_host(route: Route) -> None:
        if urllib.parse.urlsplit(route.request.url).netloc == own:
            await route.continue_()
        else:
            blocked.append(route.request.url)
            await route.abort()

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.route("**/*", only_own_host)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            await page.goto(f"{api.url}/docs")
            operations = page.locator(".opblock")
            await operations.first.wait_for(timeout=20_000)
            assert await operations.count() > 90
            summary = page.locator(".opblock-summary-description",
                                   has_text="Create an API key (its token shown once)")
            assert await summary.count() == 1
            await page.screenshot(path=str(artifacts / "api-docs-swagger.png"))

            await page.goto(f"{api.url}/redoc")
            heading = page.locator("h2", has_text="Create an API key (its token shown once)")
            await heading.first.wait_for(timeout=20_000)
            assert await page.locator("h2", has_text="Register a device").count() >= 1
            await page.screenshot(path=str(artifacts / "api-docs-redoc.png"))
        finally:
            await browser.close()
    # ReDoc's one request off the host: the "API docs by Redocly" logo, an image that
    # hides itself when it cannot load. Nothing the pages need leaves the API.
    assert set(blocked) <= {REDOC_LOGO} and errors == []

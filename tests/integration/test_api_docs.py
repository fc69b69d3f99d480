"""What the API says about itself, against the API as a process: the OpenAPI document
(written summaries, tag descriptions, examples for every JSON request body and every
successful JSON response, each valid for its schema), the stream's AsyncAPI document,
the HTTP metrics per route template, and /docs and /redoc rendered by headless Chromium
with every request off the API's own host blocked (their assets come from the API, not
a CDN)."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Iterator
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


def _generated(operation: dict[str, Any]) -> str:
    """The summary FastAPI would make from the function's name."""
    return str(operation["operationId"].split("-", 1)[-1].replace("_", " ").title())


def _has_examples(doc: dict[str, Any], schema: dict[str, Any]) -> bool:
    """The schema, or each alternative of it, carries examples; an array's items do (the
    docs show a list of one)."""
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "examples" in schema:
        return True
    if schema.get("type") == "array":
        return _has_examples(doc, schema.get("items", {}))
    alternatives = [s for s in schema.get("anyOf", schema.get("oneOf", []))
                    if s.get("type") != "null"]
    return bool(alternatives) and all(_has_examples(doc, s) for s in alternatives)


def _media_examples(content: dict[str, Any]) -> list[Any]:
    """The examples a media type (or a parameter) gives beside its schema's."""
    named = [example["value"] for example in content.get("examples", {}).values()]
    return named + ([content["example"]] if "example" in content else [])


def _subschemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The schema and every schema written inside it."""
    yield schema
    for key in ("properties", "patternProperties", "$defs"):
        for sub in schema.get(key, {}).values():
            yield from _subschemas(sub)
    for key in ("items", "additionalProperties", "propertyNames", "contains", "not"):
        if isinstance(schema.get(key), dict):
            yield from _subschemas(schema[key])
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for sub in schema.get(key, []):
            yield from _subschemas(sub)


def _invalid_examples(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """Each example in the document that its schema refuses: where, and why."""
    invalid: list[tuple[str, str]] = []

    def check(where: str, schema: dict[str, Any], examples: list[Any]) -> None:
        validator = jsonschema.Draft202012Validator({**schema, "components": doc["components"]})
        for i, example in enumerate(examples):
            invalid.extend((f"{where} example {i}", f"{'/'.join(map(str, e.absolute_path))}: "
                            f"{e.message[:200]}") for e in validator.iter_errors(example))

    def check_schema(where: str, schema: dict[str, Any]) -> None:
        for sub in _subschemas(schema):
            check(where, sub, sub.get("examples", []))

    for name, schema in doc["components"]["schemas"].items():
        check_schema(name, schema)
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            where = f"{method.upper()} {path}"
            for param in op.get("parameters", []):
                check(f"{where} {param['name']}", param.get("schema", {}), _media_examples(param))
                check_schema(f"{where} {param['name']}", param.get("schema", {}))
            contents = [(f"{where} body", op.get("requestBody", {}).get("content", {}))]
            contents += [(f"{where} {status}", response.get("content", {}))
                         for status, response in op["responses"].items()]
            for part, content in contents:
                for media, described in content.items():
                    schema = described.get("schema") or {}
                    check(f"{part} {media}", schema, _media_examples(described))
                    check_schema(f"{part} {media}", schema)
    return invalid


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
    # Every successful response but a 204 describes its body, and every JSON one shows
    # an example (its own, or its schema's).
    responses, undescribed, without = 0, [], []
    for method, path, op in operations:
        for status, response in op["responses"].items():
            if not status.startswith("2") or status == "204":
                continue
            if not response.get("content"):
                undescribed.append((method, path, status))
            for media, content in response.get("content", {}).items():
                if media != "application/json" and not media.endswith("+json"):
                    continue  # bytes (a firmware image, a file's content)
                responses += 1
                if not content.get("schema"):
                    undescribed.append((method, path, status))
                elif not _media_examples(content) and not _has_examples(doc, content["schema"]):
                    without.append((method, path, status))
    assert responses >= 80 and undescribed == [] and without == []
    # The examples are valid for their own schemas (schemathesis sends those of request
    # bodies, too).
    assert _invalid_examples(doc) == []


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

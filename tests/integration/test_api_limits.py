"""Limits the API applies before any route runs, the API key check included, measured
from outside against the real service: bodies bounded by their declared or streamed
size, oversized headers refused as problem+json, `nosniff` on every response, and
/metrics off the public port."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ApiProcess

pytestmark = pytest.mark.integration

LIMIT = 1024 * 1024  # FLEETLINE_API_MAX_BODY_BYTES's default


def raw_request(port: int, head: bytes, body: bytes = b"", *, timeout: float = 10) -> bytes:
    """Send ``head`` (and ``body``) on a fresh connection; everything the server
    answered before it closed (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        chunks = []
        try:
            while data := sock.recv(65536):
                chunks.append(data)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def status_and_problem(answer: bytes) -> tuple[int, dict[str, object], str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = "\n".join(lines[1:]).lower()
    return int(lines[0].split()[1]), json.loads(body), headers


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_declared_oversized_body_is_refused_before_it_is_read(api: ApiProcess) -> None:
    head = (b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 209715200\r\n\r\n")
    started = time.monotonic()
    status, problem, headers = status_and_problem(raw_request(api.port, head))
    assert status == 413 and problem["status"] == 413, problem
    assert "application/problem+json" in headers and "x-content-type-options: nosniff" in headers
    assert "1,048,576 bytes" in str(problem["detail"])
    assert time.monotonic() - started < 5  # answered without waiting for 200 MB


def test_streamed_oversized_bodies_stop_at_the_limit_and_memory_stays_flat(
    api: ApiProcess,
) -> None:
    """Two concurrent 200 MB chunked POSTs without a key (the probe that once took the API
    from 64 MB to 1.1 GB): each is refused with 413 once the limit has arrived."""
    assert api.proc is not None
    before = rss_kib(api.proc.pid)
    answers: list[bytes] = []

    def upload() -> None:
        head = (b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        with socket.create_connection(("127.0.0.1", api.port), timeout=20) as sock:
            sock.sendall(head)
            try:
                for _ in range(200 * 1024 * 1024 // len(chunk)):
                    sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed: what we want
            data = b""
            try:
                while more := sock.recv(65536):
                    data += more
            except (TimeoutError, ConnectionResetError):
                pass
            answers.append(data)

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 2
    for answer in answers:
        status, problem, _ = status_and_problem(answer)
        assert status == 413, problem
    grown_mib = (rss_kib(api.proc.pid) - before) / 1024
    assert grown_mib < 30, f"the API grew by {grown_mib:.0f} MB"


async def test_a_small_body_without_a_length_still_reaches_the_route(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    key = (await make_key("admin")).encode()
    body = b'{"id": "%s"}' % uid.encode()
    head = (b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + key + b"\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    framed = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    answer = await asyncio.to_thread(raw_request, api.port, head, framed)
    status, created, _ = status_and_problem(answer)
    assert status == 201 and created["id"] == uid, created


def test_oversized_headers_get_a_problem_not_the_servers_plain_text(api: ApiProcess) -> None:
    head = (b"GET /v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + b"a" * 100_000 + b"\r\n\r\n")
    status, problem, headers = status_and_problem(raw_request(api.port, head))
    assert status == 431 and problem["status"] == 431, problem
    assert "application/problem+json" in headers
    # A header block the server cannot even parse: its 400, as problem+json too.
    status, problem, headers = status_and_problem(
        raw_request(api.port, b"GET /v1/devices HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"))
    assert status == 400 and problem["status"] == 400, problem
    assert "application/problem+json" in headers


def test_every_response_says_nosniff_and_metrics_are_off_the_public_port(
    api: ApiProcess,
) -> None:
    with httpx.Client(base_url=api.url, timeout=10) as c:
        for response in (c.get("/healthz"), c.get("/v1/devices"), c.get("/nowhere")):
            assert response.headers["x-content-type-options"] == "nosniff", response.url
        assert c.get("/metrics").status_code == 404
    metrics = httpx.get(f"http://127.0.0.1:{api.metrics_port}/metrics", timeout=10)
    assert metrics.status_code == 200 and "fleetline_api" in metrics.text


@pytest.fixture(scope="module")
def limited_api(database_url: str, broker: Any, artifacts: Path) -> Iterator[ApiProcess]:
    """The API with the product's default rate per key (the shared test API has none)."""
    proc = ApiProcess(database_url=database_url, mqtt_url=broker.url, log_dir=artifacts,
                      name=f"limited-{os.getpid()}",
                      env={"FLEETLINE_API_RATE_PER_KEY": "50",
                           "FLEETLINE_API_RATE_BURST_PER_KEY": "200"})
    proc.start()
    yield proc
    proc.stop()


async def test_a_key_over_its_rate_gets_429_with_retry_after_and_others_do_not(
    limited_api: ApiProcess, make_key: Callable[..., Any],
) -> None:
    busy, quiet = await make_key("devices:read"), await make_key("devices:read")

    def hammer() -> tuple[list[httpx.Response], httpx.Response]:
        with httpx.Client(base_url=limited_api.url, timeout=10) as c:
            answers = [c.get("/v1/devices", params={"limit": 1},
                             headers={"Authorization": f"Bearer {busy}"}) for _ in range(400)]
            other = c.get("/v1/devices", params={"limit": 1},
                          headers={"Authorization": f"Bearer {quiet}"})
        return answers, other

    answers, other = await asyncio.to_thread(hammer)
    codes = [a.status_code for a in answers]
    assert set(codes) == {200, 429}, set(codes)
    assert codes.count(200) >= 200  # the burst, then about 50 a second
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["content-type"].startswith("application/problem+json")
    wait = int(refused.headers["retry-after"])
    assert 1 <= wait <= 2 and refused.json()["status"] == 429
    assert other.status_code == 200  # another key is not held up
    await asyncio.sleep(wait)
    again = httpx.get(f"{limited_api.url}/v1/devices", params={"limit": 1}, timeout=10,
                      headers={"Authorization": f"Bearer {busy}"})
    assert again.status_code == 200

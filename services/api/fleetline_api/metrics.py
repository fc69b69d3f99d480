"""HTTP request metrics of the API, per route, on its /metrics (Prometheus).

- ``fleetline_api_http_requests_total{method, route, status}``: requests answered, by
  method, route template (``/v1/devices/{device_id}``, never the raw path) and status
  code (class: ``status=~"5.."``);
- ``fleetline_api_http_request_duration_seconds{method, route}``: a histogram of the
  time from the request's arrival to the end of its answer's body;
- ``fleetline_api_http_requests_in_flight``: requests being answered;
- ``fleetline_api_build_info{version, python}``: always 1, for the build running.

Cardinality stays bounded: the route is the template the router matched (``unmatched``
for a path no route serves, refused requests too), the method one of the HTTP methods
(else ``other``), the status a code. WebSockets (``/v1/stream``) have their own metrics
(fleetline_api/workers/stream.py). On the hot path: a clock read, a dict lookup of the
label children (kept, not built per request) and a counter and histogram update.
"""

from __future__ import annotations

import platform
import time

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetline import __version__

REQUESTS = Counter(
    "fleetline_api_http_requests_total",
    "HTTP requests answered by the API, by method, route template and status code",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "fleetline_api_http_request_duration_seconds",
    "Time from an HTTP request's arrival to the end of its answer, by method and route",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
IN_FLIGHT = Gauge("fleetline_api_http_requests_in_flight", "HTTP requests being answered")
BUILD_INFO = Gauge(
    "fleetline_api_build_info",
    "The API's build: always 1, labelled with its version and Python's",
    ["version", "python"],
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)

UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


ARRIVED = "arrived"


class RequestMetrics:
    """ASGI middleware counting and timing every HTTP request (see the module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._counters: dict[tuple[str, str, int], Counter] = {}
        self._histograms: dict[tuple[str, str], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # When the request came (time.monotonic()), for routes whose deadline counts from
        # it (a direct method's timeout_s): request.state.arrived.
        scope.setdefault("state", {})[ARRIVED] = time.monotonic()
        status = 500  # unless an answer starts
        IN_FLIGHT.inc()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            IN_FLIGHT.dec()
            self._observe(scope, status, time.perf_counter() - start)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        # The router puts the route it matched in the scope (this middleware's own dict);
        # a mount (the docs' assets) its path, as the root of what it serves.
        route = getattr(scope.get("route"), "path", None)
        if route is None:
            mounted = scope.get("endpoint") and scope.get("root_path")
            route = f"{mounted}/{{path}}" if mounted else UNMATCHED
        method = scope["method"] if scope["method"] in _METHODS else "other"
        counter = self._counters.get((method, route, status))
        if counter is None:
            counter = self._counters[(method, route, status)] = REQUESTS.labels(
                method, route, str(status)
            )
        counter.inc()
        histogram = self._histograms.get((method, route))
        if histogram is None:
            histogram = self._histograms[(method, route)] = LATENCY.labels(method, route)
        histogram.observe(seconds)

"""Publisher workers for bench/ingest.py: simulated devices sending QoS 1 telemetry.

Each worker is one process with one paho client (no network thread: ``publish`` writes
to the socket directly and the PUBACKs are read between publishes), so several workers
use several cores. Devices are split between workers (device ``d`` belongs to worker
``d % workers``): each device's messages leave from one connection, in order.

A worker reports how many messages it published and how many the broker acknowledged;
the caller checks that every message was acknowledged.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

READINGS_PER_BATCH_MESSAGE = 50
MAX_INFLIGHT = 20_000
ACK_TIMEOUT_SECONDS = 120.0
# Read PUBACKs after this many publishes.
READ_EVERY = 64


def device_id(d: int) -> str:
    return f"bench-{d:05d}"


def topic(d: int) -> str:
    return f"devices/{device_id(d)}/telemetry"


@dataclass(frozen=True)
class Plan:
    """What the workers publish.

    kind "single": ``messages`` messages of one reading; message i goes to device i % K
    with ts = base_ms + i // K (unique per device).
    kind "batch": ``messages`` messages of 50 readings; message j goes to device j % K,
    its readings have ts = base_ms + (j // K) * 50 + r.
    kind "live": ``readings`` readings per message at ``rate`` messages/s in total for
    ``seconds``; the last reading's ts is the send time in epoch ms, the others the
    milliseconds before it (kept increasing per device), so a latency measured from ts
    is never less than the real one. With ``probes_per_second``, the workers also send
    that many single-reading probes in all, interleaved with the load, each with its send
    time as ts, on devices ``bench-probe-{worker}``: the poller times those.

    ``username`` and ``password``: the login of every worker's client, for a broker that
    checks logins (bench/soak.py's, with the auth plugin); without them the workers
    connect anonymously, as bench/ingest.py's broker allows.
    """

    kind: str
    host: str
    port: int
    devices: int
    messages: int = 0
    base_ms: int = 0
    rate: float = 0.0
    seconds: float = 0.0
    readings: int = 1
    probes_per_second: float = 0.0
    tag: str = "pub"
    username: str | None = None
    password: str | None = None


def probe_device(worker: int) -> str:
    return f"bench-probe-{worker}"


def _value(i: int) -> float:
    return 20.0 + (i % 997) / 10.0


def _single(plan: Plan, worker: int, workers: int) -> Iterator[tuple[str, bytes]]:
    k = plan.devices
    topics = [topic(d) for d in range(k)]
    for i in range(plan.messages):
        d = i % k
        if d % workers != worker:
            continue
        doc = {"ts": plan.base_ms + i // k, "values": {"temperature": _value(i)}}
        yield topics[d], orjson.dumps(doc)


def _batched(plan: Plan, worker: int, workers: int) -> Iterator[tuple[str, bytes]]:
    k = plan.devices
    n = READINGS_PER_BATCH_MESSAGE
    topics = [topic(d) for d in range(k)]
    for j in range(plan.messages):
        d = j % k
        if d % workers != worker:
            continue
        first = plan.base_ms + (j // k) * n
        docs = [{"ts": first + r, "values": {"temperature": _value(j * n + r)}} for r in range(n)]
        yield topics[d], orjson.dumps(docs)


class _Client:
    def __init__(self, plan: Plan, worker: int) -> None:
        self.acked = 0
        self.connected = False
        self.refused: str | None = None
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-{plan.tag}-{worker}-{time.monotonic_ns()}",
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        self.client.max_inflight_messages_set(MAX_INFLIGHT)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        if plan.username is not None:
            self.client.username_pw_set(plan.username, plan.password)
        self.client.connect(plan.host, plan.port, keepalive=60)
        deadline = time.monotonic() + 10
        while not self.connected:
            if time.monotonic() > deadline:
                raise RuntimeError("publisher could not connect to the broker")
            self.client.loop(0.05)
        if self.refused is not None:
            raise RuntimeError(f"the broker refused the publisher's connection: {self.refused}")

    def _on_publish(self, *_args: object) -> None:
        self.acked += 1

    def _on_connect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: object,
        reason_code: ReasonCode,
        _properties: object,
    ) -> None:
        # A refused login (a broker that checks them) answers with a failure code.
        if reason_code.is_failure:
            self.refused = str(reason_code)
        self.connected = True

    def wait_acked(self, sent: int) -> None:
        deadline = time.monotonic() + ACK_TIMEOUT_SECONDS
        while self.acked < sent and time.monotonic() < deadline:
            self.client.loop(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop(0.05)


def _run_bulk(plan: Plan, worker: int, workers: int) -> dict[str, float]:
    c = _Client(plan, worker)
    gen = (
        _single(plan, worker, workers) if plan.kind == "single" else _batched(plan, worker, workers)
    )
    # Payloads are encoded before the clock starts: the rate is the broker's and paho's.
    msgs = list(gen)
    publish = c.client.publish
    loop = c.client.loop
    started = time.perf_counter()
    sent = 0
    for t, payload in msgs:
        publish(t, payload, qos=1)
        sent += 1
        if sent % READ_EVERY == 0:
            loop(0)
    c.wait_acked(sent)
    elapsed = time.perf_counter() - started
    acked = c.acked
    c.close()
    return {"worker": worker, "sent": sent, "acked": acked, "seconds": elapsed}


def _run_live(plan: Plan, worker: int, workers: int) -> dict[str, float]:
    c = _Client(plan, worker)
    mine = [d for d in range(plan.devices) if d % workers == worker]
    topics = [topic(d) for d in mine]
    last_ts = [0] * len(mine)
    rate = plan.rate / workers
    n = plan.readings
    publish = c.client.publish
    loop = c.client.loop
    dumps = orjson.dumps
    sent = 0
    slot = 0
    probe_topic = f"devices/{probe_device(worker)}/telemetry"
    probe_rate = plan.probes_per_second / workers
    probes = 0
    last_probe_ts = 0
    t0 = time.time()
    end = t0 + plan.seconds
    while True:
        now = time.time()
        if now >= end:
            break
        if probes < int((now - t0) * probe_rate):
            last_probe_ts = max(int(time.time() * 1000), last_probe_ts + 1)
            publish(probe_topic, dumps({"ts": last_probe_ts, "values": {"probe": probes}}), qos=1)
            probes += 1
            sent += 1
        due = int((now - t0) * rate) + probes
        while sent < due:
            ts = int(time.time() * 1000) - (n - 1)
            if ts <= last_ts[slot]:
                ts = last_ts[slot] + 1
            last_ts[slot] = ts + n - 1
            if n == 1:
                payload = dumps({"ts": ts, "values": {"temperature": _value(sent)}})
            else:
                payload = dumps(
                    [{"ts": ts + r, "values": {"temperature": _value(sent + r)}} for r in range(n)]
                )
            publish(topics[slot], payload, qos=1)
            sent += 1
            slot = (slot + 1) % len(mine)
            if sent % READ_EVERY == 0:
                loop(0)
        loop(0.001)
    c.wait_acked(sent)
    elapsed = time.time() - t0
    acked = c.acked
    c.close()
    return {"worker": worker, "sent": sent, "acked": acked, "seconds": elapsed, "probes": probes}


def _worker(plan: Plan, worker: int, workers: int, out: mp.Queue[dict[str, float]]) -> None:
    try:
        result = (
            _run_live(plan, worker, workers)
            if plan.kind == "live"
            else _run_bulk(plan, worker, workers)
        )
    except Exception as exc:  # reported to the parent, which fails the run
        result = {"worker": worker, "sent": 0, "acked": 0, "seconds": 0.0, "error": repr(exc)}  # type: ignore[dict-item]
    out.put(result)


def publish(plan: Plan, workers: int) -> dict[str, float]:
    """Run ``workers`` publisher processes for ``plan``; wait for them; sum their results.

    Raises when a worker failed or the broker did not acknowledge every message.
    """
    ctx = mp.get_context("spawn")
    out: mp.Queue[dict[str, float]] = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(plan, w, workers, out)) for w in range(workers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=ACK_TIMEOUT_SECONDS + plan.seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"publisher failed: {errors}")
    sent = sum(int(r["sent"]) for r in results)
    acked = sum(int(r["acked"]) for r in results)
    seconds = max(r["seconds"] for r in results)
    probes = sum(int(r.get("probes", 0)) for r in results)
    if acked != sent:
        raise RuntimeError(f"broker acknowledged {acked} of {sent} published messages")
    # Probes are counted apart: "sent" and "rate" are the load.
    return {
        "sent": sent - probes,
        "acked": acked,
        "seconds": seconds,
        "probes": probes,
        "rate": (sent - probes) / seconds if seconds else 0.0,
    }

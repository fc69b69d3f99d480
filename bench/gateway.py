"""bench/gateway.py: one gateway publishing for 1,000 children against 1,000 devices
publishing for themselves, on the real stack, in the same run.

    .venv/bin/python bench/gateway.py            # 1,000 + 1,000, 3 rounds (about 3 minutes)
    .venv/bin/python bench/gateway.py --quick    # 200 + 200, 1 short round (a smoke run)

Starts its own PostgreSQL (migrated, plain partitions), Mosquitto with the project's
config and auth plugin, and fleetline ingest (a process, default settings). The devices
are registered up front as ``fleetline up`` registers its simulated fleet
(``register_fleet``: one transaction, a key each); the gateway as the simulator registers
its gateways (``register_gateways``: ``create_children`` with a pattern, limits of the
default times children + 1); its children are not registered. Two publisher processes
speak MQTT 5 themselves (CONNECT, QoS 1 PUBLISH, SUBSCRIBE and their acknowledgements,
written and read on plain sockets: a Python MQTT client would be the bound), each
message its own write with TCP_NODELAY, at most ``--window`` in flight a side: the
devices, each its own connection logged in with its key; the gateway, one connection
logged in with its key, publishing on its children's own topics.

1. Start: the devices connect (each login checked by the plugin) and each publishes its
   retained ``online``; the gateway connects and publishes each child's ``online``: the
   first message for an id the registry does not know, so the plugin asks the registry
   (``fleetline_gateway_child``), which creates it as the gateway's child. Then each
   subscribes to c2d, twin/desired and methods/+/req for itself or for each child.
2. Drain, ``--repeat`` rounds, one side after the other (which goes first alternates):
   every source publishes ``--messages`` single-reading messages as fast as the broker
   acknowledges them (ts in the past, unique per source). Readings/s from the first
   publish to the last reading stored (ingest's ``fleetline_ingest_rows_total``, polled
   every 25 ms), the CPU per message of the broker, ingest and the publishers.
   With perf, one more drain a side, not in the medians (sampling with call graphs slows
   the broker): the auth plugin's share of the broker's samples, everything under its
   frames (its code, libpq, libc, the kernel's work for them), and the self time of its
   own code (``fleetline_auth.so``) and of libpq (its database client: the broker itself
   does not use it).
3. Paced, ``--repeat`` rounds, one side at a time: every source at ``--rate`` readings/s
   for ``--seconds`` (5,000 readings/s a side by default: each device within the default
   limit of 20/s). Latency from publish to stored, for the readings of 20 probe sources a
   side (their ts is their send time), polled every 5 ms, and the broker's CPU.

Checks (exit 1): every publish and subscription granted, every child created as the
gateway's, every reading stored. Medians over the rounds; everything (broker, database,
ingest, publishers) shares the machine's cores. Results: bench/results/gateway-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import orjson  # noqa: E402
from measure import CpuWindow, log, pct, tree_cpu  # noqa: E402
from stack import Service, ingest_service, service_env  # noqa: E402

from fleetline.migrate import migrate  # noqa: E402
from fleetline.settings import StorageSettings  # noqa: E402
from fleetline_dev.embedded import BrokerAuth, LocalMosquitto, LocalPostgres  # noqa: E402
from fleetline_dev.simulated_gateways import (  # noqa: E402
    child_ids,
    register_gateways,
)
from fleetline_dev.simulator import register_fleet  # noqa: E402

SECRET = b"bench-gateway-secret-" + b"x" * 32
GATEWAY = "gw-0"
DEVICE_PREFIX = "dev-"
INGEST_USER = "fleetline-ingest"
RESULTS_DIR = BENCH_DIR / "results"
KEEPALIVE_SECONDS = 600
PING_SECONDS = 60.0
LOGINS_PENDING = 50
ACK_TIMEOUT_SECONDS = 120.0
STORE_TIMEOUT_SECONDS = 180.0
METRICS_POLL_SECONDS = 0.025
LATENCY_POLL_SECONDS = 0.005
PROBES = 20
CLOUD_TOPICS = ("c2d", "twin/desired", "methods/+/req")
SUBSCRIBE_FILTERS = 300
PERF_HZ = 999
PERF_SETTLE_SECONDS = 1.0

LATENCY_QUERY = """
SELECT w.id, (extract(epoch FROM t.ts) * 1000)::float8
FROM unnest($1::int[], $2::timestamptz[]) AS w(id, since)
CROSS JOIN LATERAL (
    SELECT ts FROM telemetry WHERE series_id = w.id AND ts > w.since AND ts >= $3
) AS t
"""


# -- the publishers (a process a side) -------------------------------------------------


@dataclass(frozen=True)
class Side:
    """What one publisher process does: ``logins`` (client id = user name, key) are its
    connections, ``sources`` the devices whose topics it publishes on; ``owner[i]`` is
    the connection that publishes for source i."""

    name: str
    port: int
    logins: list[tuple[str, str]]
    sources: list[str]
    window: int

    def owner(self, i: int) -> int:
        return i if len(self.logins) == len(self.sources) else 0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(client_id: str, key: str) -> bytes:
    """MQTT 5 CONNECT: clean start, user name (= client id) and password, no properties."""
    flags = 0x80 | 0x40 | 0x02
    body = (
        b"\x00\x04MQTT\x05"
        + bytes([flags])
        + KEEPALIVE_SECONDS.to_bytes(2, "big")
        + b"\x00"
        + _utf8(client_id)
        + _utf8(client_id)
        + _utf8(key)
    )
    return _packet(0x10, body)


def publish_packet(topic: str, mid: int, payload: bytes, *, retain: bool = False) -> bytes:
    """QoS 1 PUBLISH, no properties."""
    return _packet(0x32 | int(retain), _utf8(topic) + mid.to_bytes(2, "big") + b"\x00" + payload)


def subscribe_packet(mid: int, filters: list[str]) -> bytes:
    """SUBSCRIBE, QoS 1 for each filter, no properties."""
    return _packet(
        0x82, mid.to_bytes(2, "big") + b"\x00" + b"".join(_utf8(f) + b"\x01" for f in filters)
    )


def _read_varint(buf: bytes, at: int) -> tuple[int, int] | None:
    """(value, the index after it), or None when ``buf`` ends inside it."""
    value = shift = 0
    while at < len(buf):
        byte = buf[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7
    return None


class Conn:
    """One MQTT connection: its socket, what it read of an unfinished packet, its last
    packet id."""

    __slots__ = ("buf", "mid", "name", "sock")

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self.sock = sock
        self.buf = b""
        self.mid = 0

    def next_mid(self) -> int:
        self.mid = self.mid % 65535 + 1
        return self.mid


class Publisher:
    """The side's MQTT 5 connections, written and read by this process itself (a few
    lines of the protocol: CONNECT, PUBLISH QoS 1, SUBSCRIBE, their acknowledgements),
    so that a Python MQTT client's cost per message does not bound what the broker,
    ingest and the database are given. Every message is its own write (TCP_NODELAY), as
    a device or a gateway sends it; the answers are read as they come, through one
    selector."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self.sel = selectors.DefaultSelector()
        self.conns: list[Conn] = []
        self.sent = self.acked = self.refused = 0
        self.connacks = 0
        self.connect_refused: list[str] = []
        self.subscribed = self.subacks = self.sub_refused = 0
        self.last_ping = time.monotonic()

    def _write(self, conn: Conn, data: bytes) -> None:
        try:
            n = conn.sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):  # the socket's buffer is full: wait for room
            conn.sock.setblocking(True)
            try:
                conn.sock.sendall(data[n:])
            finally:
                conn.sock.setblocking(False)

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            conn: Conn = key.data
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                raise RuntimeError(f"{self.side.name}: the broker closed {conn.name}")
            self._parse(conn, conn.buf + data if conn.buf else data)

    def _parse(self, conn: Conn, buf: bytes) -> None:
        i, n = 0, len(buf)
        while n - i >= 2:
            if buf[i] == 0x40 and buf[i + 1] == 2:  # PUBACK, success (the usual case)
                if n - i < 4:
                    break
                self.acked += 1
                i += 4
                continue
            found = _read_varint(buf, i + 1)
            if found is None or found[1] + found[0] > n:
                break
            length, j = found
            kind = buf[i] >> 4
            if kind == 4:  # PUBACK with a reason code
                self.acked += 1
                if length >= 3 and buf[j + 2] >= 0x80:
                    self.refused += 1
            elif kind == 2:  # CONNACK
                if buf[j + 1] >= 0x80:
                    self.connect_refused.append(f"{conn.name}: {buf[j + 1]:#x}")
                else:
                    self.connacks += 1
            elif kind == 9:  # SUBACK: packet id, properties, a reason code a filter
                props = _read_varint(buf, j + 2)
                assert props is not None
                codes = buf[props[1] + props[0] : j + length]
                self.subacks += 1
                self.sub_refused += sum(1 for c in codes if c >= 0x80)
            elif kind == 14:  # DISCONNECT
                reason = buf[j] if length else 0
                raise RuntimeError(f"{self.side.name}: {conn.name} disconnected: {reason:#x}")
            i = j + length
        conn.buf = buf[i:]

    def _send(self, conn: Conn, topic: str, payload: bytes, *, retain: bool = False) -> None:
        while self.sent - self.acked >= self.side.window:
            self.pump(0.01)
        self._write(conn, publish_packet(topic, conn.next_mid(), payload, retain=retain))
        self.sent += 1

    def _wait(self, done: Any, what: str) -> None:
        deadline = time.monotonic() + ACK_TIMEOUT_SECONDS
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.side.name}: timed out waiting for {what}")
            self.pump(0.01)

    def keepalive(self) -> None:
        self.pump(0)
        if time.monotonic() - self.last_ping > PING_SECONDS:
            self.last_ping = time.monotonic()
            for conn in self.conns:
                self._write(conn, b"\xc0\x00")  # PINGREQ

    def connect(self) -> dict[str, Any]:
        """Every login, one after another; then the gateway's own ``online``."""
        t0 = time.perf_counter()
        for client_id, key in self.side.logins:
            # Mosquitto listens with a backlog of 100: past it a connection's SYN is
            # dropped and sent again a second later, which would be the figure.
            while len(self.conns) - self.connacks - len(self.connect_refused) >= LOGINS_PENDING:
                self.pump(0.01)
            sock = socket.create_connection(("127.0.0.1", self.side.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(connect_packet(client_id, key))
            sock.setblocking(False)
            conn = Conn(client_id, sock)
            self.conns.append(conn)
            self.sel.register(sock, selectors.EVENT_READ, conn)
            self.pump(0)
        self._wait(lambda: self.connacks + len(self.connect_refused) == len(self.conns), "CONNACKs")
        if self.connect_refused:
            raise RuntimeError(f"logins refused: {self.connect_refused[:3]}")
        seconds = time.perf_counter() - t0
        if len(self.conns) == 1:  # a gateway says itself online
            conn = self.conns[0]
            self._send(conn, f"devices/{conn.name}/status", b"online", retain=True)
            self._wait(lambda: self.acked == self.sent, "PUBACKs")
        return {"seconds": seconds, "logins": len(self.conns)}

    def first_messages(self) -> dict[str, Any]:
        """Each source's retained ``online``: for a child, its first message."""
        before = self.refused
        t0 = time.perf_counter()
        for i, source in enumerate(self.side.sources):
            self._send(
                self.conns[self.side.owner(i)], f"devices/{source}/status", b"online", retain=True
            )
        self._wait(lambda: self.acked == self.sent, "PUBACKs")
        return {
            "seconds": time.perf_counter() - t0,
            "messages": len(self.side.sources),
            "refused": self.refused - before,
        }

    def subscribe(self) -> dict[str, Any]:
        """c2d, twin/desired and methods/+/req of each source, on its connection."""
        t0 = time.perf_counter()
        by_owner: dict[int, list[str]] = {}
        for i, source in enumerate(self.side.sources):
            filters = by_owner.setdefault(self.side.owner(i), [])
            filters += [f"devices/{source}/{kind}" for kind in CLOUD_TOPICS]
        for owner, filters in by_owner.items():
            conn = self.conns[owner]
            for at in range(0, len(filters), SUBSCRIBE_FILTERS):
                chunk = filters[at : at + SUBSCRIBE_FILTERS]
                self._write(conn, subscribe_packet(conn.next_mid(), chunk))
                self.subscribed += 1
            self.pump(0)
        self._wait(lambda: self.subacks == self.subscribed, "SUBACKs")
        return {
            "seconds": time.perf_counter() - t0,
            "filters": len(self.side.sources) * len(CLOUD_TOPICS),
            "refused": self.sub_refused,
        }

    def drain(self, messages: int, base_ms: int) -> dict[str, Any]:
        """``messages`` readings a source, round robin over the sources, as fast as the
        window allows. The packets are encoded before the clock starts."""
        work = []
        for k in range(messages):
            for i, source in enumerate(self.side.sources):
                conn = self.conns[self.side.owner(i)]
                doc = {"ts": base_ms + k, "values": {"temperature": 20 + (k + i) % 97 / 10}}
                packet = publish_packet(
                    f"devices/{source}/telemetry", conn.next_mid(), orjson.dumps(doc)
                )
                work.append((conn, packet))
        before = (self.sent, self.refused)
        window = self.side.window
        write, pump = self._write, self.pump
        started = time.time()
        t0 = time.perf_counter()
        for conn, packet in work:
            while self.sent - self.acked >= window:
                pump(0.01)
            write(conn, packet)
            self.sent += 1
        send_seconds = time.perf_counter() - t0
        self._wait(lambda: self.acked == self.sent, "PUBACKs")
        return {
            "started": started,
            "sent": self.sent - before[0],
            "refused": self.refused - before[1],
            "send_seconds": send_seconds,
            "acked_seconds": time.perf_counter() - t0,
        }

    def paced(self, rate: float, seconds: float) -> dict[str, Any]:
        """Every source ``rate`` readings a second for ``seconds``, round robin; each
        reading's ts is its send time (epoch ms, increasing per source)."""
        sources = self.side.sources
        n = len(sources)
        topics = [f"devices/{s}/telemetry" for s in sources]
        owners = [self.conns[self.side.owner(i)] for i in range(n)]
        last = [0] * n
        total = rate * n
        before = (self.sent, self.refused)
        started = time.time()
        end = started + seconds
        i = 0
        dumps = orjson.dumps
        while (now := time.time()) < end:
            due = int((now - started) * total)
            while i < due:
                s = i % n
                ts = max(int(time.time() * 1000), last[s] + 1)
                last[s] = ts
                self._send(
                    owners[s],
                    topics[s],
                    dumps({"ts": ts, "values": {"temperature": 20 + i % 97 / 10}}),
                )
                i += 1
            self.pump(0.001)
        self._wait(lambda: self.acked == self.sent, "PUBACKs")
        return {
            "started": started,
            "sent": self.sent - before[0],
            "refused": self.refused - before[1],
            "seconds": time.time() - started,
        }

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                self._write(conn, b"\xe0\x00")  # DISCONNECT, normal
                conn.sock.close()


def publisher_main(side: Side, conn: Connection) -> None:
    """The publisher process: a command at a time from the benchmark, its answer back."""
    pub = Publisher(side)
    while True:
        while not conn.poll(0.5):
            if pub.conns:
                pub.keepalive()
        command, args = conn.recv()
        if command == "stop":
            pub.close()
            conn.send(("ok", {}))
            return
        try:
            result = getattr(pub, command)(*args)
        except Exception as exc:  # reported to the benchmark, which stops
            conn.send(("error", repr(exc)))
        else:
            conn.send(("ok", result))


class Remote:
    """The benchmark's end of a publisher process."""

    def __init__(self, side: Side) -> None:
        ctx = mp.get_context("spawn")
        self.name = side.name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=publisher_main, args=(side, child), name=side.name)
        self.proc.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    async def call(self, command: str, *args: Any) -> dict[str, Any]:
        self.conn.send((command, args))
        status, result = await asyncio.to_thread(self.conn.recv)
        if status != "ok":
            raise RuntimeError(f"{self.name} publisher: {command}: {result}")
        return dict(result)

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, EOFError):
                self.conn.send(("stop", ()))
                if self.conn.poll(10):
                    self.conn.recv()
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# -- what the benchmark watches --------------------------------------------------------


def rows_stored(ingest: Service) -> float:
    with urllib.request.urlopen(ingest.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^fleetline_ingest_rows_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class Cpu:
    """CPU seconds of the broker, ingest, PostgreSQL and the publishers over a phase, and
    the load of other processes on the machine."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.window = CpuWindow()
        self.start = {name: tree_cpu(pid) for name, pid in pids.items()}

    def end(self) -> dict[str, float]:
        used = {f"{n}_cpu_seconds": tree_cpu(p) - self.start[n] for n, p in self.pids.items()}
        return {**used, "other_cores": self.window.other_cores()}


class Perf:
    """``perf record`` on the broker for one phase, with call graphs; its shares by
    shared object: self time, and time under each (the plugin's callees included)."""

    def __init__(self, pid: int, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [
                "perf",
                "record",
                "-q",
                "-F",
                str(PERF_HZ),
                "--call-graph",
                "dwarf,16384",
                "-p",
                str(pid),
                "-o",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return {}
        shares: dict[str, Any] = {"self": {}, "under": {}, "samples": None}
        for mode, flag in (("self", "--no-children"), ("under", "--children")):
            report = ["perf", "report", "-i", str(self.path), "--sort", "dso", "--stdio"]
            out = subprocess.run(
                [*report, "-g", "none", flag], capture_output=True, text=True, timeout=300
            ).stdout
            for line in out.splitlines():
                cols = line.split()
                if line.startswith("# Samples:") and len(cols) > 2:
                    shares["samples"] = cols[2]
                elif mode == "under" and len(cols) >= 3 and cols[0].endswith("%"):
                    shares["under"][cols[2]] = float(cols[0].rstrip("%"))
                elif mode == "self" and len(cols) >= 2 and cols[0].endswith("%"):
                    shares["self"][cols[1]] = float(cols[0].rstrip("%"))
        return shares


def plugin_share(perf: dict[str, Any]) -> dict[str, float] | None:
    """The auth plugin's share of the broker's samples: its code and libpq (self), and
    everything under its frames (call graphs)."""
    if not perf or not perf.get("self"):
        return None
    own = sum(v for k, v in perf["self"].items() if k.startswith("fleetline_auth"))
    pq = sum(v for k, v in perf["self"].items() if k.startswith("libpq"))
    under = sum(v for k, v in perf["under"].items() if k.startswith("fleetline_auth"))
    return {"plugin_self": own, "libpq_self": pq, "plugin_inclusive": under}


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        url: str,
        broker: LocalMosquitto,
        pg: LocalPostgres,
        ingest: Service,
        tmp: Path,
    ) -> None:
        self.args = args
        self.url = url
        self.broker = broker
        self.pg = pg
        self.ingest = ingest
        self.tmp = tmp
        self.problems: list[str] = []
        self.perf = args.perf and shutil.which("perf") is not None
        self.sides: dict[str, Remote] = {}
        self.sources: dict[str, list[str]] = {}

    def problem(self, text: str) -> None:
        log(f"PROBLEM: {text}")
        self.problems.append(text)

    def cpu(self) -> Cpu:
        return Cpu(
            {
                "broker": self.broker.pid,
                "ingest": self.ingest.proc.pid if self.ingest.proc else None,
                "postgres": self.pg.pid,
                **{f"publisher_{n}": r.pid for n, r in self.sides.items()},
            }
        )

    async def until_stored(self, target: float) -> float:
        """Epoch time at which ingest had stored ``target`` rows in all."""
        deadline = time.monotonic() + STORE_TIMEOUT_SECONDS
        while True:
            now = time.time()
            if await asyncio.to_thread(rows_stored, self.ingest) >= target:
                return now
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest did not store {target:,.0f} rows in time")
            self.ingest.check_alive()
            await asyncio.sleep(METRICS_POLL_SECONDS)

    async def drain(self, side: str, round_no: int, *, perf: bool = False) -> dict[str, Any]:
        n = len(self.sources[side])
        base_ms = int(time.time() * 1000) - 3_600_000 + round_no * self.args.messages
        rows0 = await asyncio.to_thread(rows_stored, self.ingest)
        sampler = None
        if perf:
            sampler = Perf(self.broker.pid or 0, self.tmp / f"perf-{side}.data")
            await asyncio.sleep(PERF_SETTLE_SECONDS)  # attached before the first message
        cpu = self.cpu()
        published = await self.sides[side].call("drain", self.args.messages, base_ms)
        stored_at = await self.until_stored(rows0 + n * self.args.messages)
        used = cpu.end()
        shares = sampler.stop() if sampler else {}
        if sampler and not self.args.keep:
            sampler.path.unlink(missing_ok=True)
        wall = stored_at - published["started"]
        rows = n * self.args.messages
        if published["refused"]:
            self.problem(f"{side}: {published['refused']} publishes refused in the drain")
        result = {
            **published,
            "rows": rows,
            "stored_seconds": wall,
            "rows_per_second": rows / wall,
            "publish_rate": published["sent"] / published["acked_seconds"],
            "broker_us_per_message": used["broker_cpu_seconds"] / published["sent"] * 1e6,
            "broker_cores": used["broker_cpu_seconds"] / wall,
            "ingest_us_per_row": used["ingest_cpu_seconds"] / rows * 1e6,
            "publisher_cores": used[f"publisher_{side}_cpu_seconds"] / wall,
            "cpu": used,
            "perf": shares,
            "plugin": plugin_share(shares),
        }
        plugin = result["plugin"]
        label = f"{side} (perf)" if perf else side
        log(
            f"  drain {label}: {rows:,} readings stored at {result['rows_per_second']:,.0f}/s "
            f"(published at {result['publish_rate']:,.0f}/s), broker "
            f"{result['broker_us_per_message']:.1f} us/message"
            + (f", plugin {plugin['plugin_inclusive']:.1f}% of its samples" if plugin else "")
        )
        return result

    async def paced(self, side: str, series: list[int]) -> dict[str, Any]:
        args = self.args
        rows0 = await asyncio.to_thread(rows_stored, self.ingest)
        con = await asyncpg.connect(self.url)
        stmt = await con.prepare(LATENCY_QUERY)
        started = time.time()
        lo = datetime.fromtimestamp(started - 0.001, UTC)
        since = dict.fromkeys(series, lo)
        latencies: list[float] = []
        done = asyncio.Event()

        async def poll() -> None:
            while True:
                t = time.time()
                for sid, ts_ms in await stmt.fetch(list(since), list(since.values()), lo):
                    latencies.append(t * 1000 - ts_ms)
                    ts = datetime.fromtimestamp(ts_ms / 1000, UTC)
                    since[sid] = max(since[sid], ts)
                if done.is_set():
                    return
                await asyncio.sleep(max(0.0, LATENCY_POLL_SECONDS - (time.time() - t)))

        poller = asyncio.create_task(poll())
        cpu = self.cpu()
        try:
            published = await self.sides[side].call("paced", args.rate, args.seconds)
            stored_at = await self.until_stored(rows0 + published["sent"])
            used = cpu.end()
            await asyncio.sleep(0.05)  # one more poll after the last row
        finally:
            done.set()
            await poller
            await con.close()
        wall = stored_at - published["started"]
        if published["refused"]:
            self.problem(f"{side}: {published['refused']} publishes refused while paced")
        result = {
            **published,
            "rows_per_second": published["sent"] / wall,
            "tail_seconds": stored_at - published["started"] - published["seconds"],
            "probes": len(latencies),
            "latency_ms": {
                "p50": pct(latencies, 50),
                "p99": pct(latencies, 99),
                "max": max(latencies, default=float("nan")),
            },
            "latencies_ms": [round(x, 2) for x in latencies],
            "broker_us_per_message": used["broker_cpu_seconds"] / published["sent"] * 1e6,
            "broker_cores": used["broker_cpu_seconds"] / published["seconds"],
            "cpu": used,
        }
        lat = result["latency_ms"]
        log(
            f"  paced {side}: {published['sent']:,} readings at "
            f"{published['sent'] / published['seconds']:,.0f}/s, latency p50 {lat['p50']:.1f} "
            f"p99 {lat['p99']:.1f} ms ({len(latencies):,} probes), broker "
            f"{result['broker_us_per_message']:.1f} us/message"
        )
        return result

    async def run(self, keys: dict[str, str], registered: dict[str, float]) -> dict[str, Any]:
        args = self.args
        devices = [d for d in keys if d != GATEWAY]
        children = child_ids(GATEWAY, args.children)
        self.sources = {"devices": devices, "gateway": children}
        sides = {
            "devices": Side(
                "devices", self.broker.port, [(d, keys[d]) for d in devices], devices, args.window
            ),
            "gateway": Side(
                "gateway", self.broker.port, [(GATEWAY, keys[GATEWAY])], children, args.window
            ),
        }
        for name, side in sides.items():
            self.sides[name] = Remote(side)
        start: dict[str, Any] = {"registered_seconds": registered}
        for name in sides:
            cpu = self.cpu()
            start[name] = {
                "connect": await self.sides[name].call("connect"),
                "first": await self.sides[name].call("first_messages"),
                "subscribe": await self.sides[name].call("subscribe"),
                "broker_cpu_seconds": cpu.end()["broker_cpu_seconds"],
            }
            s = start[name]
            log(
                f"{name}: {s['connect']['logins']:,} logins in {s['connect']['seconds']:.2f} s, "
                f"{s['first']['messages']:,} first messages in {s['first']['seconds']:.2f} s, "
                f"{s['subscribe']['filters']:,} subscriptions in "
                f"{s['subscribe']['seconds']:.2f} s"
            )
            if s["first"]["refused"] or s["subscribe"]["refused"]:
                self.problem(
                    f"{name}: refused {s['first']['refused']} first messages, "
                    f"{s['subscribe']['refused']} subscriptions"
                )
        adopted = await self.fetchval("SELECT count(*) FROM devices WHERE parent_id = $1", GATEWAY)
        start["children_created"] = adopted
        if adopted != len(children):
            self.problem(f"{adopted} of {len(children)} children created as the gateway's")
        drains: dict[str, list[dict[str, Any]]] = {"devices": [], "gateway": []}
        paced: dict[str, list[dict[str, Any]]] = {"devices": [], "gateway": []}
        series: dict[str, list[int]] = {}
        for r in range(args.repeat):
            order = ["devices", "gateway"] if r % 2 == 0 else ["gateway", "devices"]
            log(f"round {r + 1} of {args.repeat}")
            for side in order:
                drains[side].append(await self.drain(side, r))
                await asyncio.sleep(1)
            for side in order:
                if side not in series:  # the probes' series, made by the drain
                    ids = self.sources[side]
                    series[side] = [
                        int(x["id"])
                        for x in await self.fetch(
                            "SELECT id FROM series WHERE metric = 'temperature' "
                            "AND device_id = ANY($1)",
                            ids[:: max(1, len(ids) // PROBES)][:PROBES],
                        )
                    ]
                paced[side].append(await self.paced(side, series[side]))
                await asyncio.sleep(1)
        # Profiled apart: sampling with call graphs slows the broker.
        profiled: dict[str, dict[str, Any]] = {}
        if self.perf:
            log("one more drain a side, the broker sampled by perf")
            for side in ("devices", "gateway"):
                profiled[side] = await self.drain(side, args.repeat, perf=True)
                await asyncio.sleep(1)
        expected = {
            side: sum(x["sent"] for x in drains[side] + paced[side])
            + (profiled[side]["sent"] if side in profiled else 0)
            for side in self.sources
        }
        stored = {
            "devices": await self.fetchval(
                "SELECT count(*) FROM readings WHERE device_id LIKE $1", DEVICE_PREFIX + "%"
            ),
            "gateway": await self.fetchval(
                "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id "
                "WHERE d.parent_id = $1",
                GATEWAY,
            ),
        }
        for side in self.sources:
            if stored[side] != expected[side]:
                self.problem(f"{side}: {stored[side]:,} readings stored of {expected[side]:,}")
        for remote in self.sides.values():
            remote.stop()
        return {
            "start": start,
            "drain": drains,
            "paced": paced,
            "profiled": profiled,
            "stored": stored,
            "expected": expected,
        }

    async def fetchval(self, query: str, *params: Any) -> Any:
        con = await asyncpg.connect(self.url)
        try:
            return await con.fetchval(query, *params)
        finally:
            await con.close()

    async def fetch(self, query: str, *params: Any) -> list[Any]:
        con = await asyncpg.connect(self.url)
        try:
            return list(await con.fetch(query, *params))
        finally:
            await con.close()


# -- the report -------------------------------------------------------------------------


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key`` (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


HEADER = f"  {'':46} {'devices':>12} {'gateway':>12} {'gw/dev':>10}"


def report(args: argparse.Namespace, res: dict[str, Any]) -> str:
    start, drains, paced = res["start"], res["drain"], res["paced"]
    d, g = start["devices"], start["gateway"]
    reg = start["registered_seconds"]
    n_dev, n_child = args.devices, args.children
    lines = [
        f"One gateway publishing for {n_child:,} children against {n_dev:,} devices "
        f"publishing for themselves (MQTT 5, QoS 1, single readings, {args.window:,} in "
        f"flight a side), {args.repeat} round{'s' if args.repeat > 1 else ''}",
        "",
        "start",
        f"  devices: {n_dev:,} registered up front in {reg['devices'] * 1000:,.0f} ms (one "
        f"transaction, a key each); {d['connect']['logins']:,} logins in "
        f"{d['connect']['seconds']:.2f} s; their first messages in "
        f"{d['first']['seconds'] * 1000:,.0f} ms",
        f"  gateway: registered in {reg['gateway'] * 1000:,.0f} ms; 1 login in "
        f"{g['connect']['seconds'] * 1000:,.0f} ms; {start['children_created']:,} children "
        f"created on their first message in {g['first']['seconds']:.2f} s "
        f"({n_child / g['first']['seconds']:,.0f}/s, "
        f"{g['first']['seconds'] / n_child * 1e6:,.0f} us each, through "
        "fleetline_gateway_child)",
        f"  subscriptions (c2d, twin/desired, methods/+/req a source): devices "
        f"{d['subscribe']['seconds'] * 1000:,.0f} ms, gateway "
        f"{g['subscribe']['seconds'] * 1000:,.0f} ms",
        f"  broker CPU for all of it: devices {d['broker_cpu_seconds']:.2f} s, gateway "
        f"{g['broker_cpu_seconds']:.2f} s",
        "",
    ]

    def row(label: str, dv: Any, gv: Any, fmt: str, ratio: bool = True) -> str:
        text = f"  {label:46} {format(dv, fmt):>12} {format(gv, fmt):>12}"
        if ratio and isinstance(dv, float | int) and dv:
            text += f" {gv / dv:>9.2f}x"
        return text

    md = {s: median_run(drains[s], "rows_per_second") for s in drains}
    rates = {s: [r["rows_per_second"] for r in drains[s]] for s in drains}
    lines += [
        f"drain: {args.messages} messages a source ({n_dev * args.messages:,} / "
        f"{n_child * args.messages:,} readings), the median round of {args.repeat}",
        HEADER,
        row(
            "readings/s stored (first publish -> last stored)",
            md["devices"]["rows_per_second"],
            md["gateway"]["rows_per_second"],
            ",.0f",
        ),
        row(
            "  rounds min-max",
            f"{min(rates['devices']):,.0f}-{max(rates['devices']):,.0f}",
            f"{min(rates['gateway']):,.0f}-{max(rates['gateway']):,.0f}",
            "",
            ratio=False,
        ),
        row(
            "publishes acknowledged/s",
            md["devices"]["publish_rate"],
            md["gateway"]["publish_rate"],
            ",.0f",
        ),
        row(
            "broker CPU, us per message",
            md["devices"]["broker_us_per_message"],
            md["gateway"]["broker_us_per_message"],
            ".1f",
        ),
        row("broker cores", md["devices"]["broker_cores"], md["gateway"]["broker_cores"], ".2f"),
        row(
            "ingest CPU, us per reading",
            md["devices"]["ingest_us_per_row"],
            md["gateway"]["ingest_us_per_row"],
            ".1f",
        ),
        row(
            "publisher process, cores",
            md["devices"]["publisher_cores"],
            md["gateway"]["publisher_cores"],
            ".2f",
        ),
    ]
    lines.append(
        row(
            "other load, cores",
            md["devices"]["cpu"]["other_cores"],
            md["gateway"]["cpu"]["other_cores"],
            ".2f",
            ratio=False,
        )
    )
    prof = res.get("profiled") or {}
    if prof.get("devices", {}).get("plugin") and prof.get("gateway", {}).get("plugin"):
        pd, pgw = prof["devices"]["plugin"], prof["gateway"]["plugin"]
        bd, bg = prof["devices"]["broker_us_per_message"], prof["gateway"]["broker_us_per_message"]
        lines += [
            "",
            f"a drain more a side, the broker sampled by perf ({PERF_HZ} Hz, call graphs)",
            HEADER,
            row("broker CPU, us per message (sampled)", bd, bg, ".1f"),
            row(
                "auth plugin: share of broker samples under it, %",
                pd["plugin_inclusive"],
                pgw["plugin_inclusive"],
                ".1f",
            ),
            row(
                "  its own code / libpq, self %",
                f"{pd['plugin_self']:.1f} / {pd['libpq_self']:.1f}",
                f"{pgw['plugin_self']:.1f} / {pgw['libpq_self']:.1f}",
                "",
                ratio=False,
            ),
            row(
                "auth plugin, us per message (share x CPU)",
                pd["plugin_inclusive"] / 100 * bd,
                pgw["plugin_inclusive"] / 100 * bg,
                ".1f",
            ),
        ]
    mp_ = {s: median_run(paced[s], "broker_us_per_message") for s in paced}
    lat = {s: [x for r in paced[s] for x in r["latencies_ms"]] for s in paced}
    lines += [
        "",
        f"paced: {args.rate:g} readings/s a source ({n_dev * args.rate:,.0f} / "
        f"{n_child * args.rate:,.0f} a second) for {args.seconds:g} s, {args.repeat} "
        f"round{'s' if args.repeat > 1 else ''} (latency: every probe of every round)",
        HEADER,
        row(
            "readings/s stored",
            statistics.median(r["rows_per_second"] for r in paced["devices"]),
            statistics.median(r["rows_per_second"] for r in paced["gateway"]),
            ",.0f",
        ),
        row(
            "publish -> stored p50, ms",
            pct(lat["devices"], 50),
            pct(lat["gateway"], 50),
            ".1f",
        ),
        row(
            "publish -> stored p99, ms",
            pct(lat["devices"], 99),
            pct(lat["gateway"], 99),
            ".1f",
        ),
        row(
            "  probes timed",
            len(lat["devices"]),
            len(lat["gateway"]),
            ",d",
            ratio=False,
        ),
        row(
            "broker CPU, us per message (median round)",
            mp_["devices"]["broker_us_per_message"],
            mp_["gateway"]["broker_us_per_message"],
            ".1f",
        ),
        row("broker cores", mp_["devices"]["broker_cores"], mp_["gateway"]["broker_cores"], ".3f"),
        row(
            "other load, cores",
            mp_["devices"]["cpu"]["other_cores"],
            mp_["gateway"]["cpu"]["other_cores"],
            ".2f",
            ratio=False,
        ),
        "",
        f"stored: devices {res['stored']['devices']:,} of {res['expected']['devices']:,}, "
        f"gateway's children {res['stored']['gateway']:,} of {res['expected']['gateway']:,}",
    ]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------


async def register(
    url: str, devices: int, children: int
) -> tuple[dict[str, str], dict[str, float]]:
    await migrate(url, StorageSettings(timescale="off"), create_database=True)
    ids = [f"{DEVICE_PREFIX}{i:04d}" for i in range(devices)]
    t0 = time.perf_counter()
    keys = await register_fleet(url, ids, SECRET)
    t1 = time.perf_counter()
    keys |= await register_gateways(url, [GATEWAY], SECRET, children=children)
    t2 = time.perf_counter()
    return keys, {"devices": t1 - t0, "gateway": t2 - t1}


async def amain(args: argparse.Namespace) -> int:
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="flb-gateway-"))
    os.chmod(tmp, 0o755)
    log(f"temporary directory {tmp}")
    ingest_password = os.urandom(12).hex()
    try:
        with LocalPostgres(tmp / "pg") as pg:
            url = pg.url_for("bench_gateway")
            keys, registered = await register(url, args.devices, args.children)
            auth = BrokerAuth(url, SECRET, services={INGEST_USER: ingest_password})
            with LocalMosquitto(tmp / "mq", auth=auth) as broker:
                env = {
                    **service_env(url),
                    "FLEETLINE_MQTT_URL": f"mqtt://{INGEST_USER}:{ingest_password}@127.0.0.1:{broker.port}",
                }
                ingest = ingest_service(tmp, env, client_id="bench-gateway-ingest")
                ingest.start()
                bench = Bench(args, url, broker, pg, ingest, tmp)
                try:
                    results = await bench.run(keys, registered)
                finally:
                    for remote in bench.sides.values():
                        remote.stop()
                    ingest.stop()
                load = os.getloadavg()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    text = report(args, results)
    print()
    print(text)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"gateway-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "args": vars(args),
                "cpus": os.cpu_count(),
                "loadavg_end": load,
                "perf": bench.perf,
                **results,
                "problems": bench.problems,
                "report": text,
                "total_seconds": time.time() - started,
            },
            indent=1,
            default=str,
        )
    )
    print(f"\ntotal {time.time() - started:.0f} s; results: {out.relative_to(ROOT)}")
    if bench.problems:
        print(f"\n{len(bench.problems)} PROBLEM(S):")
        for problem in bench.problems:
            print(f"  {problem}")
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=1000, help="devices of their own")
    p.add_argument("--children", type=int, default=1000, help="children of the one gateway")
    p.add_argument(
        "--messages",
        type=int,
        default=200,
        help="single-reading messages a source publishes in each drain",
    )
    p.add_argument("--rate", type=float, default=5.0, help="paced readings/s a source")
    p.add_argument("--seconds", type=float, default=15.0, help="each paced phase")
    p.add_argument("--repeat", type=int, default=3, help="rounds (medians over them)")
    p.add_argument("--window", type=int, default=1000, help="publishes in flight a side")
    p.add_argument(
        "--no-perf",
        dest="perf",
        action="store_false",
        help="do not sample the broker with perf in the drains",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: 200 + 200 sources, one short round"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.devices = args.children = 200
        args.messages, args.seconds, args.repeat, args.rate = 20, 3.0, 1, 5.0
    return args


def main() -> None:
    sys.exit(asyncio.run(amain(parse_args())))


if __name__ == "__main__":
    main()

"""What an operator does over REST while the faults go on: cloud-to-device messages,
direct method calls, twin updates and reads, spread over both API processes (the
other one when one does not answer, as a load balancer would). Every answer's status
is recorded, and every method call's time."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

METHOD_TIMEOUT_S = 5
# Longer than a run: every message must be completed, not expire.
C2D_TTL_S = 3600
PAUSE_SECONDS = (0.3, 1.2)


@dataclass
class Answer:
    at: float
    method: str
    path: str
    status: int
    seconds: float
    body: str = ""


@dataclass
class Record:
    answers: list[Answer] = field(default_factory=list)
    c2d_ids: dict[str, str] = field(default_factory=dict)  # message id -> device
    methods: list[Answer] = field(default_factory=list)
    unreachable: int = 0  # requests neither API process answered
    # Requests an API process took and did not answer (killed meanwhile): (when, what).
    interrupted: list[tuple[float, str]] = field(default_factory=list)

    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.answers)


class Api:
    """Both API processes, with an admin key: a request goes to one, and to the other if
    that one does not answer (killed, restarting)."""

    def __init__(self, urls: list[str], key: str, record: Record) -> None:
        self.clients = [httpx.Client(base_url=u, timeout=60,
                                     headers={"Authorization": f"Bearer {key}"}) for u in urls]
        self.record = record
        self._next = 0
        self._lock = threading.Lock()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        with self._lock:
            first = self._next
            self._next = (self._next + 1) % len(self.clients)
        for i in range(len(self.clients)):
            client = self.clients[(first + i) % len(self.clients)]
            started = time.monotonic()
            try:
                answer = client.request(method, path, **kwargs)
            except httpx.ConnectError:  # not taken: the other process, as a balancer would
                continue
            except httpx.TransportError as exc:  # taken and lost: not sent again
                self.record.interrupted.append((time.time(), f"{method} {path}: {exc!r}"))
                return None
            seconds = time.monotonic() - started
            text = answer.text[:300] if answer.status_code >= 400 else ""
            self.record.answers.append(
                Answer(time.time(), method, path, answer.status_code, seconds, text))
            return answer
        self.record.unreachable += 1
        return None

    def close(self) -> None:
        for c in self.clients:
            c.close()


class Workload(threading.Thread):
    """Random operations on random devices (from ``seed``) until stopped."""

    def __init__(self, api: Api, devices: list[str], seed: int) -> None:
        super().__init__(daemon=True, name="chaos-workload")
        self.api = api
        self.devices = devices
        self.rng = random.Random(f"{seed}/workload")
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.n = 0

    def run(self) -> None:
        try:
            while not self.stopped.wait(self.rng.uniform(*PAUSE_SECONDS)):
                self.step()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def step(self) -> None:
        self.n += 1
        device = self.rng.choice(self.devices)
        op = self.rng.choice(("c2d", "method", "twin", "read"))
        if op == "c2d":
            answer = self.api.request("POST", f"/v1/devices/{device}/messages",
                                      json={"body": {"n": self.n}, "ttl_s": C2D_TTL_S})
            if answer is not None and answer.status_code == 201:
                self.api.record.c2d_ids[answer.json()["id"]] = device
        elif op == "method":
            answer = self.api.request("POST", f"/v1/devices/{device}/methods/ping",
                                      json={"params": {"n": self.n},
                                            "timeout_s": METHOD_TIMEOUT_S})
            if answer is not None:
                self.api.record.methods.append(self.api.record.answers[-1])
        elif op == "twin":
            self.api.request("PATCH", f"/v1/devices/{device}/twin",
                             json={"chaos": self.n})
        else:
            self.api.request("GET", f"/v1/devices/{device}/latest")

    def stop(self) -> None:
        self.stopped.set()
        self.join(120)

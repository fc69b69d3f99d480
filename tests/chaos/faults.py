"""The faults of a chaos run, drawn from a seed: the same seed gives the same faults, in
the same order, at the same times from the start of the run, with the same parameters."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.chaos.cluster import Cluster

KINDS = (
    "kill -9 ingest",
    "kill -9 api",
    "kill -9 rules",
    "broker restart",
    "broker kill -9",
    "database restart",
    "database kill -9",
    "database paused",
    "relay cut",
)
PAUSE_SECONDS = 30.0
GAP_SECONDS = (3.0, 10.0)
CUT_SECONDS = (3.0, 10.0)


@dataclass
class Fault:
    at: float  # seconds from the start of the faults
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    started: float | None = None  # epoch seconds, once injected
    ended: float | None = None

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind}{f' ({extra})' if extra else ''}"


def schedule(seed: int, rounds: int) -> list[Fault]:
    """Every kind of fault once per round, in an order and with gaps drawn from ``seed``.
    The times assume each fault lasts what its parameters say (a restart about 2 s)."""
    rng = random.Random(f"{seed}/faults")
    faults: list[Fault] = []
    at = 0.0
    for _ in range(rounds):
        kinds = list(KINDS)
        rng.shuffle(kinds)
        for kind in kinds:
            at += rng.uniform(*GAP_SECONDS)
            params: dict[str, Any] = {}
            lasts = 2.0
            if kind == "kill -9 api":
                params["api"] = rng.randrange(2)
            elif kind == "database paused":
                params["seconds"] = PAUSE_SECONDS
                lasts = PAUSE_SECONDS
            elif kind == "relay cut":
                params["seconds"] = round(rng.uniform(*CUT_SECONDS), 1)
                params["silent"] = rng.random() < 0.5
                lasts = params["seconds"]
            faults.append(Fault(round(at, 1), kind, params))
            at += lasts
    return faults


def inject(cluster: Cluster, fault: Fault) -> None:
    p = fault.params
    broker = cluster.broker
    assert broker is not None
    actions: dict[str, Callable[[], None]] = {
        "kill -9 ingest": lambda: cluster.kill_service(cluster.services()["ingest"]),
        "kill -9 api": lambda: cluster.kill_service(cluster.apis[p.get("api", 0)]),
        "kill -9 rules": lambda: cluster.kill_service(cluster.services()["rules"]),
        "broker restart": lambda: cluster.restart(broker, crash=False),
        "broker kill -9": lambda: cluster.restart(broker, crash=True),
        "database restart": lambda: cluster.restart(cluster.pg, crash=False),
        "database kill -9": lambda: cluster.restart(cluster.pg, crash=True),
        "database paused": lambda: cluster.pause_database(p.get("seconds", PAUSE_SECONDS)),
        "relay cut": lambda: cluster.cut_relay(p.get("seconds", 3.0),
                                               silent=p.get("silent", False)),
    }
    fault.started = time.time()
    actions[fault.kind]()
    fault.ended = time.time()


class Injector(threading.Thread):
    """Injects the faults at their times (a fault that would start while the previous
    one is still under way waits for it); ``error`` holds what stopped it. ``stop``
    ends it between faults (the fault under way ends first: see Cluster.stop)."""

    def __init__(self, cluster: Cluster, faults: list[Fault],
                 say: Callable[[str], None]) -> None:
        super().__init__(daemon=True, name="chaos-faults")
        self.cluster = cluster
        self.faults = faults
        self.say = say
        self.error: BaseException | None = None
        self.t0 = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        self.t0 = time.monotonic()
        try:
            for fault in self.faults:
                if self.stopped.wait(max(0.0, self.t0 + fault.at - time.monotonic())):
                    return
                self.say(f"t={time.monotonic() - self.t0:6.1f} s  {fault.describe()}")
                inject(self.cluster, fault)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self, timeout: float = 60.0) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout)

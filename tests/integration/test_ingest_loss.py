"""The loss cases measured from outside, each on a real broker and database of its own.

Every reading the broker acknowledged to a device is stored exactly once: across a
clean broker restart with the subscription ingest uses by default, and across a broker
crash for readings that carry ``ts`` (the broker restores its last save, which cannot
hold what came in after it; ingest writes what it holds anyway, since such readings are
idempotent).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetline_dev.embedded import LocalMosquitto
from tests.conftest import count_rows, wait_rows
from tests.integration.test_ingest_faults import Publisher, assert_exactly_once
from tests.support import IngestProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.storage]


@pytest.mark.parametrize("share_group", ["", "ingest"], ids=["default", "shared"])
async def test_clean_broker_restart_before_ingest_resubscribes(
    start_ingest: Callable[..., IngestProcess], db: asyncpg.Pool[Any], uid: str,
    tmp_path: Path, share_group: str,
) -> None:
    """Readings published after a clean broker restart, before ingest is back: the
    default plain subscription is restored by the broker and queues them; a shared
    subscription is not (Mosquitto forgets ``$share`` subscriptions on restart), so the
    opt-in scale-out mode loses them, as the docs state."""
    devices, half = 10, 300
    env = {"FLEETLINE_INGEST_SHARE_GROUP": share_group} if share_group else {}
    with LocalMosquitto(tmp_path / "mq") as mq:
        ingest = start_ingest(mqtt_url=mq.url, env=env)
        pub = Publisher(mq.url, uid, devices, half * 2)
        pub.start(first=0, count=half).join()
        wait_until(lambda: ingest.metric("fleetline_ingest_messages_total") >= devices * half,
                   what="first half written")
        assert ingest.proc is not None
        # Ingest cannot resubscribe until it is continued: every reading of the second
        # half is published in the window the broker restart opens.
        ingest.proc.send_signal(signal.SIGSTOP)
        try:
            mq.stop()
            mq.start()
            for dev in pub.devices:
                wait_until(dev.connected.is_set, what="device reconnected")
            pub.start(first=half, count=half).join()
        finally:
            ingest.proc.send_signal(signal.SIGCONT)
        wait_until(ingest.ready, what="ingest reconnected")
        if not share_group:
            await assert_exactly_once(db, uid, devices, half * 2)
        else:
            time.sleep(2)
            stored = await count_rows(db, uid)
            assert stored == devices * half, (
                f"{stored}: Mosquitto now keeps $share subscriptions across a restart; "
                "update the README and FLEETLINE_INGEST_SHARE_GROUP's note")
        pub.close()


async def test_broker_crash_after_its_last_save_loses_no_reading_that_carries_ts(
    start_ingest: Callable[..., IngestProcess], db: asyncpg.Pool[Any], uid: str,
    tmp_path: Path,
) -> None:
    devices, per_device = 10, 300
    total = devices * per_device
    # Saved only when told (SIGUSR1): no periodic save may come between it and the kill.
    with LocalMosquitto(tmp_path / "mq", extra_config="autosave_interval 0") as mq:
        ingest = start_ingest(mqtt_url=mq.url)
        assert mq.pid is not None
        # The broker saves its state (ingest's session and subscription) now; everything
        # after this exists only in its memory and in ingest's.
        os.kill(mq.pid, signal.SIGUSR1)
        wait_until(lambda: "Saving in-memory database" in mq.log_path.read_text(),
                   what="broker saved its state")
        async with db.acquire() as con:
            tx = con.transaction()
            await tx.start()
            await con.execute("LOCK TABLE telemetry IN EXCLUSIVE MODE")
            pub = Publisher(mq.url, uid, devices, per_device).start()
            pub.join()  # all acknowledged by the broker to the devices
            wait_until(lambda: ingest.metric("fleetline_ingest_pending_messages") == total,
                       what="ingest holding every reading")
            assert mq.log_path.read_text().count("Saving in-memory database") == 1
            mq.kill()
            mq.start()
            await tx.rollback()
        await assert_exactly_once(db, uid, devices, per_device)
        wait_until(lambda: ingest.metric("fleetline_ingest_mqtt_connected") == 1,
                   what="ingest reconnected")
        wait_until(lambda: ingest.metric("fleetline_ingest_pending_messages") == 0,
                   what="nothing held")
        pub.close()


async def test_the_broker_queue_cap_is_never_reached_silently(
    start_ingest: Callable[..., IngestProcess], db: asyncpg.Pool[Any], uid: str,
    tmp_path: Path,
) -> None:
    """At ``max_queued_messages`` the broker drops messages it acknowledged to devices.
    Ingest cannot prevent that, but it counts every one of them: stored plus dropped is
    exactly what the devices sent."""
    devices, per_device = 4, 500
    total = devices * per_device
    cap = "max_queued_messages 300\nsys_interval 1"
    with LocalMosquitto(tmp_path / "mq", extra_config=cap) as mq:
        ingest = start_ingest(mqtt_url=mq.url,
                              env={"FLEETLINE_INGEST_MAX_PENDING_MESSAGES": "200"})
        async with db.acquire() as con:
            tx = con.transaction()
            await tx.start()
            await con.execute("LOCK TABLE telemetry IN EXCLUSIVE MODE")
            pub = Publisher(mq.url, uid, devices, per_device).start()
            pub.join()
            wait_until(lambda: ingest.metric("fleetline_broker_dropped_messages") > 0,
                       what="the broker's drops reported")
            await tx.rollback()
        time.sleep(2)  # the broker's counters come every second
        dropped = int(ingest.metric("fleetline_broker_dropped_messages"))
        stored = await wait_rows(db, uid, total - dropped, timeout=60)
        time.sleep(1)
        assert await count_rows(db, uid) == stored
        assert int(ingest.metric("fleetline_broker_dropped_messages")) == dropped
        assert stored + dropped == total, (stored, dropped)
        assert "the broker dropped" in ingest.log_path.read_text()
        pub.close()

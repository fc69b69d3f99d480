"""The common acknowledge-after-commit consumer (fleetline/consumer.py) on a real broker:
its bounds, its generations, its policy for refused credentials."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge

from fleetline.consumer import AckConsumer, Bounds, Gauges
from fleetline.settings import ConsumerSettings
from fleetline_dev.embedded import LocalMosquitto
from tests.support import Device

pytestmark = pytest.mark.integration


class Received:
    """What a service would do: keep every message (``hold``), acknowledge on demand."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, str, int, int]] = []  # generation, topic, mid, qos
        self.consumer: AckConsumer | None = None
        self.total = 0

    def handler(self, topic: str, payload: bytes, mid: int, qos: int, retain: bool) -> None:
        assert self.consumer is not None
        self.messages.append((self.consumer.generation, topic, mid, qos))
        self.total += 1
        self.consumer.hold(1, 0, len(payload))

    def commit(self, count: int) -> bool:
        """Acknowledge and release the first ``count`` held messages."""
        assert self.consumer is not None
        done, self.messages = self.messages[:count], self.messages[count:]
        acked = all(self.consumer.acknowledge(g, [(mid, qos)]) for g, _t, mid, qos in done)
        self.consumer.release(len(done))
        return acked


def consumer_for(url: str, uid: str, received: Received, bound: int, *, share_group: str = "",
                 previous_share_groups: tuple[str, ...] = ()) -> AckConsumer:
    settings = ConsumerSettings.model_validate(
        {"FLEETLINE_MQTT_URL": url, "client_id": f"{uid}-consumer", "share_group": share_group})
    registry = CollectorRegistry()
    gauges = Gauges(*(Gauge(f"g_{name}", name, registry=registry)
                      for name in ("held", "paused", "connected")))
    received.consumer = AckConsumer(
        settings, service="test", topics=[f"devices/{uid}-d/telemetry"],
        handler=received.handler, bounds=Bounds(bound), gauges=gauges,
        previous_share_groups=previous_share_groups)
    return received.consumer


@contextlib.asynccontextmanager
async def running(consumer: AckConsumer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(consumer.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(check: object, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_reads_pause_at_the_bound_and_resume_below_half(
    broker: LocalMosquitto, uid: str
) -> None:
    received = Received()
    consumer = consumer_for(broker.url, uid, received, bound=100)
    async with running(consumer):
        await eventually(lambda: consumer.subscribed, "subscribed")
        dev = Device(broker.url, f"{uid}-d")
        await asyncio.to_thread(dev.publish_all, [b"{}"] * 300)
        await eventually(lambda: consumer.paused, "paused at the bound")
        await asyncio.sleep(0.3)
        held = consumer.held_messages
        assert 100 <= held < 300, held  # a buffered read may finish its packets
        assert received.commit(held - 60)  # 60 still held: above half the bound
        await asyncio.sleep(0.2)
        assert consumer.paused
        assert received.total == held
        assert received.commit(20)  # 40 held: below half, reads resume
        await eventually(lambda: received.total > held, "reads resumed")
        while received.total < 300:  # the service keeps up: everything comes
            assert received.commit(len(received.messages))
            await asyncio.sleep(0.05)
        assert received.commit(len(received.messages))
        assert consumer.held_messages == 0
        await eventually(lambda: not consumer.paused, "not paused")
        dev.close()


async def test_messages_of_a_lost_connection_are_never_acknowledged_but_redelivered(
    uid: str, tmp_path: Path
) -> None:
    with LocalMosquitto(tmp_path / "mq") as mq:
        received = Received()
        consumer = consumer_for(mq.url, uid, received, bound=1000)
        async with running(consumer):
            await eventually(lambda: consumer.subscribed, "subscribed")
            dev = Device(mq.url, f"{uid}-d", persistent=True)
            await asyncio.to_thread(dev.publish_all, [b"{}"] * 10)
            await eventually(lambda: len(received.messages) == 10, "10 received")
            first = consumer.generation
            mq.stop()  # a clean restart: the session and the 10 in flight are saved
            mq.start()
            await eventually(lambda: consumer.subscribed and consumer.generation > first,
                             "reconnected")
            assert not consumer.acknowledge(first, [(received.messages[0][2], 1)])
            # The 10 come again on the new connection; the old ones are still held.
            await eventually(lambda: len(received.messages) == 20, "10 redelivered")
            assert {g for g, *_ in received.messages[10:]} == {consumer.generation}
            assert not received.commit(10)  # the old generation: nothing sent
            assert received.commit(10)
            assert consumer.held_messages == 0
            dev.close()


async def test_refused_credentials_are_retried_not_fatal(
    uid: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with LocalMosquitto(tmp_path / "mq", extra_config="allow_anonymous false") as mq:
        received = Received()
        consumer = consumer_for(mq.url, uid, received, bound=100)
        with caplog.at_level(logging.ERROR, logger="fleetline.consumer"):
            async with running(consumer) as task:
                await eventually(lambda: "refused test's credentials" in caplog.text,
                                 "the refusal logged")
                await asyncio.sleep(0.5)
                assert not task.done(), "refused credentials must not end the service"
                assert not consumer.connected


async def test_a_share_group_left_in_the_session_is_dropped(broker: LocalMosquitto,
                                                            uid: str) -> None:
    """A session carried over from a release that subscribed in a share group holds that
    subscription too: unsubscribed, each message arrives once, not twice."""
    old = Received()
    async with running(consumer_for(broker.url, uid, old, 100, share_group="old")) as task:
        await eventually(lambda: old.consumer is not None and old.consumer.subscribed,
                         "subscribed in the group")
    assert task.done()
    received = Received()
    consumer = consumer_for(broker.url, uid, received, 100, previous_share_groups=("old",))
    async with running(consumer):
        await eventually(lambda: consumer.subscribed, "subscribed plainly")
        await asyncio.sleep(0.2)  # the UNSUBSCRIBE went out with the SUBSCRIBE
        dev = Device(broker.url, f"{uid}-d")
        await asyncio.to_thread(dev.publish_all, [b"{}"] * 5)
        await eventually(lambda: received.total >= 5, "5 received")
        await asyncio.sleep(0.5)
        assert received.total == 5
        assert received.commit(5)
        dev.close()


async def test_a_new_session_gets_no_retained_replay(broker: LocalMosquitto, uid: str) -> None:
    """MQTT 5, Retain Handling 2: what was retained before is not sent on subscribing
    (consumers took it in when it was published); what is published after is."""
    dev = Device(broker.url, f"{uid}-d")
    dev.publish(b"{}", retain=True).wait_for_publish(10)
    received = Received()
    consumer = consumer_for(broker.url, uid, received, 100)
    async with running(consumer):
        await eventually(lambda: consumer.subscribed, "subscribed")
        await asyncio.sleep(0.5)
        assert received.total == 0, "a retained message was replayed"
        await asyncio.to_thread(dev.publish_all, [b"{}"])
        await eventually(lambda: received.total == 1, "the new message")
        assert received.commit(1)
    dev.publish(b"", retain=True).wait_for_publish(10)  # clear the retained message
    dev.close()

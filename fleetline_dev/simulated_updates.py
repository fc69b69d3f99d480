"""The device side of firmware rollouts, for the simulated fleet (docs/ota.md).

A simulated device does what the ESP32 application (firmware/common/fleetline_ota.py)
does, in its own task so it goes on publishing meanwhile: on a desired ``firmware`` of a
rollout it has not seen, it checks the manifest (the release key's signature, its own
model as the target, a version newer than its own), asks for a download URL on
``devices/{id}/transfers/req``, downloads over HTTPS proving itself with a SAS token,
checks the size and SHA-256 (a request left unanswered, a download the API could not
serve or that broke off is tried again after a backoff, as the application does, with
shorter limits: 2 s doubling to 30 s, 8 attempts), and
reports each state in ``reported.firmware``:
downloading (with progress), verifying, applying, rebooting, then succeeded (running the
new version), or failed / rolled_back with a reason. ``fail_share`` and
``rollback_share`` of the devices (chosen by device and rollout, the same on every run)
fail when applying or roll back after the reboot, as a fleet in the field does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from fleetline import devicekeys, mqtt, releases
from fleetline.protocol import TRANSFER_REQUEST, TWIN_REPORTED, topic_for

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_SECONDS = 15.0
PUBLISH_TIMEOUT_SECONDS = 10.0
DOWNLOAD_TIMEOUT_SECONDS = 60.0
# A download's failed attempts wait from RETRY_MIN_SECONDS, doubling, up to
# RETRY_MAX_SECONDS; after ATTEMPTS the update fails (the application's backoff,
# firmware/common/fleetline_https.py, with limits that fit a rollout's phase timeouts).
RETRY_MIN_SECONDS = 2.0
RETRY_MAX_SECONDS = 30.0
ATTEMPTS = 8
# Concurrent downloads over the whole fleet (one process's connections).
MAX_DOWNLOADS = 50


@dataclass(frozen=True)
class UpdatePolicy:
    """How the simulated fleet takes updates: ``release_key`` is the release key's
    public point (without it every release is refused), ``ca_file`` verifies the
    devices' HTTPS listener."""

    release_key: bytes | None = None
    ca_file: Path | None = None
    fail_share: float = 0.0
    rollback_share: float = 0.0
    reboot_seconds: float = 1.0


class Refused(Exception):
    """The update fails with this reason (str)."""


class _Again(Refused):
    """This attempt failed; another may not (no answer, the API could not serve it)."""


def _version_key(version: str) -> list[tuple[int, int, str]]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in version.split(".")]


class FleetUpdates:
    """What the fleet shares: the policy, one HTTP client, a bound on downloads."""

    def __init__(self, policy: UpdatePolicy) -> None:
        self.policy = policy
        verify: ssl.SSLContext | bool = True
        if policy.ca_file is not None:
            verify = ssl.create_default_context(cafile=policy.ca_file)
        self.http = httpx.AsyncClient(verify=verify, timeout=DOWNLOAD_TIMEOUT_SECONDS)
        self.downloads = asyncio.Semaphore(MAX_DOWNLOADS)

    async def aclose(self) -> None:
        await self.http.aclose()


class DeviceUpdates:
    """One simulated device's updates."""

    def __init__(
        self, fleet: FleetUpdates, device_id: str, key: str | None, version: str, model: str
    ) -> None:
        self.fleet = fleet
        self.device_id = device_id
        self.key = key
        self.version = version
        self.model = model
        self.rollout: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: mqtt.Client | None = None  # the connection the update runs on
        self._answers: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def take_desired(self, client: mqtt.Client, firmware: Any) -> None:
        """The desired ``firmware``: a rollout not seen before starts an update. The same
        rollout again on a new connection (the retained desired twin after a reconnection)
        while its update still runs on the old one starts it over on the new one, as the
        application does; on the same connection it is a repeat, and ignored."""
        if not isinstance(firmware, dict):
            return
        rollout = firmware.get("rollout")
        if type(rollout) is not int:
            return
        running = self._task is not None and not self._task.done()
        if rollout == self.rollout and (client is self._client or not running):
            return
        self.rollout, self._client = rollout, client
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.create_task(
            self._update(client, rollout, firmware), name=f"simulator.update[{self.device_id}]"
        )

    def take_answer(self, payload: bytes) -> None:
        with contextlib.suppress(ValueError):
            answer = orjson.loads(payload)
            request_id = answer.get("id") if isinstance(answer, dict) else None
            waiting = self._answers.get(request_id) if isinstance(request_id, str) else None
            if waiting is not None and not waiting.done():
                waiting.set_result(answer)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _report(self, client: mqtt.Client, rollout: int, state: str, **extra: Any) -> None:
        status = {"rollout": rollout, "state": state, "running": self.version, **extra}
        patch: dict[str, Any] = {"firmware": status}
        if state == "succeeded":
            patch["fw"] = self.version
        await client.publish(
            topic_for(self.device_id, TWIN_REPORTED),
            orjson.dumps(patch),
            qos=1,
            timeout=PUBLISH_TIMEOUT_SECONDS,
        )

    async def _update(self, client: mqtt.Client, rollout: int, told: dict[str, Any]) -> None:
        policy = self.fleet.policy
        try:
            manifest = self._check(told)
            if manifest["version"] == self.version:  # already there: nothing to do
                await self._report(client, rollout, "succeeded")
                return
            await self._report(client, rollout, "downloading", progress=0)
            await self._fetch(client, rollout, told.get("id"), manifest)
            await self._report(client, rollout, "verifying")
            await self._report(client, rollout, "applying")
            chance = random.Random(f"{self.device_id}/{rollout}").random()
            if chance < policy.fail_share:
                raise Refused("simulated: the flash write failed")
            await self._report(client, rollout, "rebooting")
            await asyncio.sleep(policy.reboot_seconds)
            if chance < policy.fail_share + policy.rollback_share:
                await self._report(
                    client,
                    rollout,
                    "rolled_back",
                    reason=f"simulated: version {manifest['version']} did not come up",
                )
                return
            self.version = manifest["version"]
            await self._report(client, rollout, "succeeded")
        except Refused as exc:
            with contextlib.suppress(mqtt.MqttError):
                await self._report(client, rollout, "failed", reason=str(exc))
        except (mqtt.MqttError, OSError, httpx.HTTPError) as exc:
            # The connection went: the device reports again when the rollout notifies it
            # after its reconnection (a new desired document) or times out.
            log.debug("device %s: update interrupted: %r", self.device_id, exc)
            self.rollout = None

    async def _fetch(
        self, client: mqtt.Client, rollout: int, firmware_id: Any, manifest: dict[str, Any]
    ) -> None:
        """Ask for the URL and download the image, again after a backoff when an attempt
        fails for a reason that may pass."""
        for attempt in range(ATTEMPTS):
            try:
                url = await self._ask(client, firmware_id)
                await self._download(client, rollout, url, manifest)
                return
            except (_Again, httpx.HTTPError) as exc:
                if attempt == ATTEMPTS - 1:
                    raise Refused(f"{exc} ({ATTEMPTS} attempts)") from None
                delay = min(RETRY_MAX_SECONDS, RETRY_MIN_SECONDS * 2**attempt)
                log.debug("device %s: download again in %g s: %r", self.device_id, delay, exc)
                await asyncio.sleep(delay)

    def _check(self, told: dict[str, Any]) -> dict[str, Any]:
        point = self.fleet.policy.release_key
        if point is None:
            raise Refused("no release key is configured on this device")
        try:
            text = str(told["manifest"]).encode()
            signature = bytes.fromhex(str(told["signature"]))
        except (KeyError, ValueError):
            raise Refused("the notification is malformed") from None
        if not releases.verify(point, text, signature):
            raise Refused("the manifest's signature is not the release key's")
        manifest: dict[str, Any] = json.loads(text)
        if manifest.get("target") != self.model:
            raise Refused(f"the release is for {manifest.get('target')}, this is {self.model}")
        if _version_key(str(manifest["version"])) < _version_key(self.version):
            raise Refused(f"the release {manifest['version']} is not newer than {self.version}")
        return manifest

    async def _ask(self, client: mqtt.Client, firmware_id: Any) -> str:
        request_id = uuid.uuid4().hex
        waiting: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._answers[request_id] = waiting
        try:
            await client.publish(
                topic_for(self.device_id, TRANSFER_REQUEST),
                orjson.dumps({"id": request_id, "op": "download", "firmware": firmware_id}),
                qos=1,
                timeout=PUBLISH_TIMEOUT_SECONDS,
            )
            answer = await asyncio.wait_for(waiting, ANSWER_TIMEOUT_SECONDS)
        except TimeoutError:
            raise _Again("no answer to the download request") from None
        finally:
            self._answers.pop(request_id, None)
        status = answer.get("status")
        if isinstance(status, int) and (status >= 500 or status == 429):
            raise _Again(f"the API could not answer the download request: {answer.get('error')}")
        if status != 200:
            raise Refused(f"the API refused the download: {answer.get('error')}")
        return str(answer["url"])

    async def _download(
        self, client: mqtt.Client, rollout: int, url: str, manifest: dict[str, Any]
    ) -> None:
        headers = {}
        if self.key is not None:
            token, _ = devicekeys.sas_token(self.key, self.device_id)
            headers["Authorization"] = f"SharedAccessSignature sr={self.device_id}&{token}"
        digest, size, reported = hashlib.sha256(), 0, 0
        async with (
            self.fleet.downloads,
            self.fleet.http.stream("GET", url, headers=headers) as response,
        ):
            if response.status_code >= 500 or response.status_code == 429:
                raise _Again(f"the download answered {response.status_code}")
            if response.status_code != 200:
                raise Refused(f"the download answered {response.status_code}")
            async for chunk in response.aiter_bytes():
                digest.update(chunk)
                size += len(chunk)
                progress = 100 * size // max(1, manifest["size"])
                if progress - reported >= 50:
                    reported = progress
                    await self._report(client, rollout, "downloading", progress=min(100, progress))
        if size != manifest["size"] or digest.hexdigest() != manifest["sha256"]:
            raise Refused("the image is not what its manifest says")

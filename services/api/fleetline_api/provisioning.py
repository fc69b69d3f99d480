"""Self-provisioning: a device registers itself through an enrollment (docs/provisioning.md).

The device has already proven its enrollment credential: at the broker's provisioning
login (the auth plugin) or in the SAS token of ``POST /v1/provision`` (routes/provision.py).
:func:`register` then, in one transaction:

* checks the enrollment again (it may have been disabled, or its pattern changed, since
  the login) and the registration id against its pattern;
* creates the device (id = registration id) with the enrollment's tags, its way of
  logging in (a key; or the group CA's certificates; or the individual certificate's
  thumbprint) and its initial desired twin; or, when it exists already and this
  enrollment made it, keeps it (``reprovision: keep``) or resets its tags and desired
  twin (``reset``). A device registered by hand or through another enrollment is never
  taken over;
* records the registration (one row per enrollment and registration id, its latest
  outcome and an operation id the device may poll with).

The answer carries the device id, how it logs in (a key device gets its current key: it
proved the enrollment credential, which yields as much), and the MQTT endpoint.
Registrations per enrollment are rate-limited in each API process.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from fleetline import devicekeys
from fleetline_api import commands, registry
from fleetline_api.queries import provisioning as sql
from fleetline_api.ratelimit import KeyRateLimiter
from fleetline_api.settings import ApiSettings, device_mqtt_url
from fleetline_api.waits import AUTH_TIMEOUT_SECONDS
from fleetline_api.workers.broker import BrokerLink

log = logging.getLogger(__name__)

ASSIGNED, FAILED, THROTTLED = "assigned", "failed", "throttled"


@dataclass(frozen=True)
class Outcome:
    """A registration's answer (the JSON a device gets: :meth:`as_json`)."""

    status: str
    enrollment_id: str
    registration_id: str
    operation_id: str | None = None
    device_id: str | None = None
    auth: dict[str, Any] = field(default_factory=dict)
    mqtt_url: str | None = None
    error: str | None = None
    retry_after_s: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {})}


class Provisioner:
    def __init__(self, settings: ApiSettings, pool: Any, broker: BrokerLink) -> None:
        self.settings = settings
        self.pool = pool
        self.broker = broker
        self.limiter = KeyRateLimiter(settings.provision_rate, settings.provision_burst)
        # Failed REST attempts per client address, then one a second (a guesser costs a
        # query and an HMAC each).
        burst = settings.provision_failures_burst
        self.failures = KeyRateLimiter(1.0 if burst else 0.0, max(burst, 1))

    def mqtt_url(self) -> str:
        return device_mqtt_url(self.settings)

    def enrollment_key(self, enrollment: asyncpg.Record) -> str:
        return devicekeys.enrollment_key(
            self.settings.key_secret, enrollment["id"], enrollment["key_version"]
        )

    def registration_key(self, enrollment: asyncpg.Record, registration_id: str) -> str:
        """The key a device of a symmetric-key enrollment proves."""
        key = self.enrollment_key(enrollment)
        if enrollment["kind"] == "individual":
            return key
        return devicekeys.registration_key(key, registration_id)

    async def enrollment(self, enrollment_id: str, registration_id: str) -> asyncpg.Record | None:
        """The enrollment with ``allowed``: whether the registration id fits it."""
        # As the key check of an API request: bounded, waiting for a connection included.
        async with self.pool.acquire(timeout=AUTH_TIMEOUT_SECONDS) as con:
            row: asyncpg.Record | None = await con.fetchrow(
                sql.ENROLLMENT_FOR, enrollment_id, registration_id
            )
        return row

    async def register(self, enrollment_id: str, registration_id: str) -> Outcome:
        wait = self.limiter.take(enrollment_id)
        if wait is not None:
            log.warning(
                "registrations of an enrollment over its rate",
                extra={"enrollment_id": enrollment_id, "registration_id": registration_id},
            )
            return Outcome(
                THROTTLED,
                enrollment_id,
                registration_id,
                error=f"more than {self.limiter.rate:g} registrations a second in this enrollment",
                retry_after_s=wait,
            )
        operation_id = str(uuid.uuid4())
        async with self.pool.acquire() as con, con.transaction():
            enrollment = await con.fetchrow(sql.LOCK_ENROLLMENT, enrollment_id, registration_id)
            error = _refusal(enrollment, enrollment_id, registration_id)
            created = False
            if error is None:
                created = await self._create(con, enrollment, registration_id)
                device = await con.fetchrow(sql.LOCK_DEVICE, registration_id)
                if device is None or device["enrollment_id"] != enrollment_id:
                    error = f"device {registration_id} is registered outside this enrollment"
            if error is not None:
                if enrollment is not None:
                    await con.execute(
                        sql.RECORD,
                        enrollment_id,
                        registration_id,
                        None,
                        operation_id,
                        FAILED,
                        error,
                    )
                log.warning(
                    "registration refused: %s",
                    error,
                    extra={"enrollment_id": enrollment_id, "registration_id": registration_id},
                )
                return Outcome(FAILED, enrollment_id, registration_id, operation_id, error=error)
            if created:
                desired = dict(enrollment["initial_desired"]) or None
            else:
                desired = await self._keep_or_reset(con, enrollment, registration_id)
            await con.execute(
                sql.RECORD,
                enrollment_id,
                registration_id,
                registration_id,
                operation_id,
                ASSIGNED,
                None,
            )
        if desired is not None:
            await self._publish_desired(registration_id, desired)
        log.info(
            "device provisioned",
            extra={
                "enrollment_id": enrollment_id,
                "registration_id": registration_id,
                "new": created,
            },
        )
        return await self._answer(enrollment_id, registration_id, operation_id)

    async def _create(self, con: Any, enrollment: Any, device_id: str) -> bool:
        """Create the device unless it exists (whoever made it): whether it was made."""
        auth, thumbprint, ca = _auth_of(enrollment)
        made = await con.fetchval(
            sql.INSERT_DEVICE,
            device_id,
            enrollment["initial_tags"],
            auth,
            thumbprint,
            ca,
            enrollment["id"],
        )
        if made is not None and auth == "key":
            await registry.issue_key(con, self.settings, device_id)
        return made is not None

    async def _keep_or_reset(
        self, con: Any, enrollment: Any, device_id: str
    ) -> dict[str, Any] | None:
        """A device this enrollment made before: kept, or its tags and desired twin reset;
        the desired patch to apply (None: none)."""
        if enrollment["reprovision"] != "reset":
            return None
        await con.execute(sql.RESET_TAGS, device_id, enrollment["initial_tags"])
        current = await con.fetchval(sql.DESIRED_OF, device_id) or {}
        patch: dict[str, Any] = dict.fromkeys(current)
        patch.update(enrollment["initial_desired"])
        return patch or None

    async def _publish_desired(self, device_id: str, patch: dict[str, Any]) -> None:
        """The initial (or reset) desired twin; published retained when the broker link
        is up, else stored for the next patch to publish."""
        try:
            await commands.apply_desired(self.pool, self.broker, device_id, patch)
        except commands.BrokerDownError:
            await self.pool.execute(sql.STORE_DESIRED, device_id, patch)
            log.warning(
                "initial desired twin stored, not published (no broker link)",
                extra={"device_id": device_id},
            )

    async def _answer(self, enrollment_id: str, registration_id: str, operation_id: str) -> Outcome:
        row = await self.pool.fetchrow(sql.ANSWER, enrollment_id, registration_id)
        if row is None or str(row["operation_id"]) != operation_id:
            return Outcome(
                FAILED, enrollment_id, registration_id, operation_id, error="no such operation"
            )
        if row["status"] != ASSIGNED:
            return Outcome(FAILED, enrollment_id, registration_id, operation_id, error=row["error"])
        auth: dict[str, Any] = {"type": row["auth"]}
        if row["auth"] == "key" and row["key_version"]:
            issued = registry.credentials(self.settings, row["device_id"], row["key_version"])
            auth |= {"key": issued.key, "key_version": issued.key_version}
        return Outcome(
            ASSIGNED,
            enrollment_id,
            registration_id,
            operation_id,
            device_id=row["device_id"],
            auth=auth,
            mqtt_url=self.mqtt_url(),
        )

    async def status(self, enrollment_id: str, registration_id: str, operation_id: str) -> Outcome:
        """The outcome of an earlier registration, by its operation id."""
        return await self._answer(enrollment_id, registration_id, operation_id)


def _refusal(enrollment: Any, enrollment_id: str, registration_id: str) -> str | None:
    if enrollment is None:
        return f"enrollment {enrollment_id} not found"
    if not enrollment["enabled"]:
        return f"enrollment {enrollment_id} is disabled"
    if enrollment["kind"] == "individual" and registration_id != enrollment_id:
        return "an individual enrollment registers only its own id"
    if not enrollment["allowed"]:
        return f"registration id {registration_id} is outside the enrollment's pattern"
    return None


def _auth_of(enrollment: Any) -> tuple[str, bytes | None, str | None]:
    """How a device it creates logs in: its auth, thumbprint and CA."""
    if enrollment["attestation"] == "symmetric_key":
        return "key", None, None
    if enrollment["kind"] == "group":
        return "x509_ca", None, enrollment["ca_name"]
    return "x509_self_signed", enrollment["thumbprint"], None

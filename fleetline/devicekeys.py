"""Device credentials: keys, SAS tokens and connection strings (docs/protocol.md, section 1).

A device's symmetric key is derived, never stored: ``key = HMAC-SHA256(secret,
"{device_id}\\n{version}")``, where ``secret`` is the deployment's device-key secret
(``FLEETLINE_DEVICE_KEY_SECRET``, held by the api service and by the broker's auth
plugin) and ``version`` is the device's ``key_version`` in the registry. The registry
keeps the version and a SHA-256 fingerprint of the key, so a database dump alone reveals
no key; regenerating a key bumps the version, which invalidates the old key and every
token signed with it at the broker.

A key travels as base64 (standard alphabet) of its 32 bytes. A SAS token signs
``"{device_id}\\n{expiry}"`` with the key's bytes:
``sig=<base64 hmac-sha256(key_bytes, ...)>&se=<expiry, epoch seconds>``. The MQTT
password is either such a token or the key itself. ``deploy/mosquitto/auth`` verifies
both with the same arithmetic, in C.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

KEY_BYTES = 32
DEFAULT_TOKEN_TTL_SECONDS = 3600
MAX_TOKEN_TTL_SECONDS = 366 * 24 * 3600
# A token may run this much past MAX_TOKEN_TTL_SECONDS when checked: the clocks of the
# signer and the checker (the broker's auth plugin allows the same).
TOKEN_CLOCK_SLACK_SECONDS = 300
MIN_SECRET_BYTES = 32


class DeviceKeyError(ValueError):
    pass


def check_secret(secret: bytes) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise DeviceKeyError(
            f"the device-key secret must hold at least {MIN_SECRET_BYTES} bytes; "
            "generate one with `python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return secret


def derive_key(secret: bytes, device_id: str, version: int) -> str:
    """The device's key (base64) for ``version``."""
    digest = hmac.new(check_secret(secret), f"{device_id}\n{version}".encode(), hashlib.sha256)
    return base64.b64encode(digest.digest()).decode()


def enrollment_key(secret: bytes, enrollment_id: str, version: int) -> str:
    """An enrollment's symmetric key (base64) for ``version``: HMAC-SHA256(secret,
    "enrollment\\n{id}\\n{version}"), a derivation no device key shares."""
    message = f"enrollment\n{enrollment_id}\n{version}".encode()
    return base64.b64encode(
        hmac.new(check_secret(secret), message, hashlib.sha256).digest()
    ).decode()


def registration_key(group_key: str, registration_id: str) -> str:
    """The key a device of an enrollment group proves: HMAC-SHA256(group key bytes,
    registration id), base64, as Azure's Device Provisioning Service derives it."""
    mac = hmac.new(_key_bytes(group_key), registration_id.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def fingerprint(key: str) -> bytes:
    """What the registry keeps of a key: SHA-256 of its bytes."""
    return hashlib.sha256(_key_bytes(key)).digest()


def _key_bytes(key: str) -> bytes:
    try:
        raw = base64.b64decode(key, validate=True)
    except ValueError as exc:
        raise DeviceKeyError("a device key is base64") from exc
    if len(raw) != KEY_BYTES:
        raise DeviceKeyError(f"a device key holds {KEY_BYTES} bytes")
    return raw


def sign(key: str, device_id: str, expiry: int) -> str:
    mac = hmac.new(_key_bytes(key), f"{device_id}\n{expiry}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def sas_token(
    key: str,
    device_id: str,
    *,
    ttl_seconds: int = DEFAULT_TOKEN_TTL_SECONDS,
    now: float | None = None,
) -> tuple[str, int]:
    """A token valid for ``ttl_seconds`` from ``now``, and its expiry (epoch seconds)."""
    if not 1 <= ttl_seconds <= MAX_TOKEN_TTL_SECONDS:
        raise DeviceKeyError(f"ttl must be between 1 and {MAX_TOKEN_TTL_SECONDS} seconds")
    expiry = int(time.time() if now is None else now) + ttl_seconds
    return f"sig={sign(key, device_id, expiry)}&se={expiry}", expiry


def verify_password(key: str, device_id: str, password: str, *, now: float | None = None) -> bool:
    """The broker's check, in Python (for tests and tools): the key, or a live token."""
    if not password.startswith("sig="):
        return hmac.compare_digest(password.encode(), key.encode())
    sig, sep, expiry = password[4:].partition("&se=")
    # ASCII digits only: isdigit() alone also takes "²", which int() refuses.
    if not sep or not (expiry.isascii() and expiry.isdecimal()) or len(expiry) > 18:
        return False
    current = time.time() if now is None else now
    if not current < int(expiry) <= current + MAX_TOKEN_TTL_SECONDS + TOKEN_CLOCK_SLACK_SECONDS:
        return False  # expired, or valid longer than any token fleetline signs
    return hmac.compare_digest(sig.encode(), sign(key, device_id, int(expiry)).encode())


def connection_string(*, host: str, port: int, device_id: str, key: str) -> str:
    """``HostName=...;Port=...;DeviceId=...;SharedAccessKey=...``, as Azure IoT devices
    read it (with the MQTT port added)."""
    return f"HostName={host};Port={port};DeviceId={device_id};SharedAccessKey={key}"

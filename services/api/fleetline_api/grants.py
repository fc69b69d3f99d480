"""Transfer grants: the short-lived URLs a device downloads firmware from or uploads a
file to (docs/ota.md, docs/uploads.md).

A grant names what it is for (``firmware`` or ``upload``), the device it was signed for,
the object (a firmware or upload id) and its expiry; the URL carries it as
``base64url(fields).base64url(HMAC-SHA256(grant key, fields))``. The grant key is
derived from the device-key secret, so every API replica signs and checks the same
grants without sharing anything new, and no device key can sign one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass

KINDS = ("firmware", "upload")
# A grant is ASCII of a few fields: anything longer is not one.
MAX_TOKEN_CHARS = 512


class GrantError(Exception):
    """Not a grant this deployment signed, or one past its expiry (str: which)."""


@dataclass(frozen=True, slots=True)
class Grant:
    kind: str
    device_id: str
    object_id: int
    expires: int  # epoch seconds


def grant_key(secret: bytes) -> bytes:
    return hmac.new(secret, b"fleetline transfer grants", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, grant: Grant) -> str:
    fields = f"{grant.kind}\n{grant.device_id}\n{grant.object_id}\n{grant.expires}".encode()
    mac = hmac.new(key, fields, hashlib.sha256).digest()
    return f"{_b64(fields)}.{_b64(mac)}"


def verify(key: bytes, token: str, *, now: float | None = None) -> Grant:
    """The grant ``token`` holds; GrantError when it is not one signed with ``key`` or
    has expired."""
    head, dot, tail = token.partition(".")
    if not dot or len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise GrantError("not a transfer URL of this deployment")
    try:
        fields, mac = _unb64(head), _unb64(tail)
    except (binascii.Error, ValueError):
        raise GrantError("not a transfer URL of this deployment") from None
    if not hmac.compare_digest(mac, hmac.new(key, fields, hashlib.sha256).digest()):
        raise GrantError("not a transfer URL of this deployment")
    kind, device_id, object_id, expires = fields.decode().split("\n")
    grant = Grant(kind, device_id, int(object_id), int(expires))
    if grant.expires <= (time.time() if now is None else now):
        raise GrantError("this transfer URL has expired: ask for a new one")
    return grant

"""Firmware releases: the manifest a device checks before it trusts an image, and the
release key that signs it.

A manifest names an image by its version, target (the board or model it is for), kind
(``bundle``: the application files ``fleetline firmware build`` makes; ``image``: a
whole firmware binary), size and SHA-256. Its bytes are canonical JSON (keys sorted, no
spaces), and the signature covers exactly those bytes: ECDSA over NIST P-256 with
SHA-256, sent as r || s (64 bytes). The device carries the release key's public half
(x || y, 64 bytes, hex in its config) and checks both with
firmware/common/fleetline_release.py, which needs only SHA-256 (Ed25519 would need
SHA-512, which MicroPython on the ESP32 lacks).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

Kind = Literal["bundle", "image"]
KINDS: tuple[Kind, ...] = ("bundle", "image")
# A version or target: what a device compares and shows, never a path or markup.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ReleaseError(ValueError):
    """A manifest or release key is not what it must be (one line for the user)."""


@dataclass(frozen=True)
class Manifest:
    version: str
    target: str
    kind: Kind
    size: int
    sha256: str

    def __post_init__(self) -> None:
        for field in ("version", "target"):
            if not NAME.fullmatch(getattr(self, field)):
                raise ReleaseError(
                    f"{field} must be 1-64 letters, digits or . _ + - (starting with a "
                    "letter or digit)"
                )
        if self.kind not in KINDS:
            raise ReleaseError(f"kind must be one of {', '.join(KINDS)}")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ReleaseError("size must be a positive number of bytes")
        if not SHA256_HEX.fullmatch(self.sha256):
            raise ReleaseError("sha256 must be 64 lowercase hex digits")

    def to_bytes(self) -> bytes:
        """The signed bytes: canonical JSON."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            doc: Any = json.loads(data)
        except ValueError as exc:
            raise ReleaseError(f"a manifest is JSON: {exc}") from None
        if not isinstance(doc, dict) or set(doc) != {"version", "target", "kind", "size", "sha256"}:
            raise ReleaseError("a manifest has exactly version, target, kind, size, sha256")
        manifest = cls(**doc)
        if manifest.to_bytes() != data:
            raise ReleaseError("a manifest's bytes are its canonical JSON")
        return manifest


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """The private key as PEM, readable by its owner only; never over an existing file."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ReleaseError(f"{path} exists: a release key is never overwritten") from None
    except OSError as exc:
        raise ReleaseError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ReleaseError(f"cannot read the release key {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise ReleaseError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ReleaseError(f"{path} is not a P-256 (secp256r1) key")
    return key


def public_point(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """x || y of the key's public point: what a device's config carries (in hex)."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]


def sign(key: ec.EllipticCurvePrivateKey, manifest: Manifest) -> bytes:
    """r || s over the manifest's bytes."""
    r, s = decode_dss_signature(key.sign(manifest.to_bytes(), ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def verify(point: bytes, manifest: bytes, signature: bytes) -> bool:
    """Whether ``signature`` (r || s) over ``manifest`` is by the key with public ``point``
    (x || y), as a device checks it."""
    if len(point) != 64 or len(signature) != 64:
        return False
    try:
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + point)
    except ValueError:
        return False
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    try:
        public.verify(der, manifest, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True

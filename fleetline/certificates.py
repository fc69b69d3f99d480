"""X.509 device identities: thumbprints, CA certificates and their proof of possession.

A device's certificate is known by its SHA-256 thumbprint (of its DER encoding), as Azure
IoT names it: 64 hex digits, colons allowed. A CA certificate becomes trusted once its
owner proves possession of its key by signing a certificate whose common name is the
verification code fleetline gave. The broker's auth plugin (``deploy/mosquitto/auth``)
does the checks at login; this module is what the API and the CLI check beforehand.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

THUMBPRINT_BYTES = 32
_HEX_THUMBPRINT = re.compile(r"^(?:[0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$")
MAX_PEM_CHARS = 16384


class CertificateError(ValueError):
    """A certificate or thumbprint that cannot be used, with the reason."""


def load_pem(text: str) -> x509.Certificate:
    """The one certificate in ``text`` (PEM)."""
    if len(text) > MAX_PEM_CHARS:
        raise CertificateError(f"a certificate in PEM is at most {MAX_PEM_CHARS} characters")
    try:
        certs = x509.load_pem_x509_certificates(text.encode())
    except ValueError as exc:
        raise CertificateError("not a PEM certificate") from exc
    if len(certs) != 1:
        raise CertificateError("give exactly one certificate")
    cert = certs[0]
    try:  # what is parsed only when read: a malformed one fails here, not later
        cert.extensions  # noqa: B018
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
    except ValueError as exc:  # also x509.DuplicateExtension
        raise CertificateError(f"malformed certificate: {exc}") from exc
    return cert


def thumbprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER encoding."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


def parse_thumbprint(text: str) -> bytes:
    """A thumbprint given as hex (upper or lower case, colons allowed)."""
    if not _HEX_THUMBPRINT.match(text):
        raise CertificateError(
            f"a thumbprint is the SHA-256 of the certificate: {2 * THUMBPRINT_BYTES} hex digits"
        )
    return bytes.fromhex(text.replace(":", ""))


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


def _check_validity(cert: x509.Certificate, what: str) -> None:
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        raise CertificateError(f"the {what} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        raise CertificateError(
            f"the {what} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )


def check_ca(cert: x509.Certificate) -> None:
    """That ``cert`` may sign devices' certificates: a CA, valid now."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError("not a CA certificate (its basic constraints must say CA:TRUE)")
    _check_validity(cert, "CA certificate")


def check_proof(ca: x509.Certificate, proof: x509.Certificate, code: str) -> None:
    """That ``proof`` shows possession of the CA's key: signed by it, with the
    verification ``code`` as its common name."""
    if common_name(proof) != code:
        raise CertificateError("the certificate's common name must be the verification code")
    try:
        proof.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError("the certificate is not signed by the CA's key") from exc
    _check_validity(proof, "verification certificate")

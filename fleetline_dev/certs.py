"""A local certificate authority for the broker's TLS listener (``fleetline up``, tests).

On first use it makes, in a folder of its own, a CA (``ca.crt``, ``ca.key``) and a server
certificate it signed (``server.crt``, ``server.key``) for this machine's names and
addresses. Devices are given ``ca.crt`` and verify the broker against it. Later runs reuse
the files; a server certificate that expires within a month, or that does not name a
host asked for, is made again under the same CA, so devices keep working.

Keys are ECDSA P-256: the MicroPython firmware verifies them in its TLS handshake, and
they are small enough for a board's flash and heap. Private keys are written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetline_dev.embedded import write_private

CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers and most TLS clients still accept for a leaf
RENEW_BEFORE = dt.timedelta(days=30)
CA_NAME = "fleetline local CA"


@dataclass(frozen=True)
class TlsFiles:
    """The files a TLS listener needs, and the CA file to give devices."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def outward_address() -> str | None:
    """The address of the interface that routes outwards (found without sending anything),
    if the machine has a route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks a route
        except OSError:
            return None
        return str(probe.getsockname()[0])


def machine_names() -> list[str]:
    """Names and addresses devices may use to reach this machine: localhost, loopback,
    the host name and the outward address."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), outward_address()]
    return list(dict.fromkeys(n for n in names if n))


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _subject_alt_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def make_ca(
    folder: Path, *, name: str = CA_NAME
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA in ``folder`` (``ca.crt``, ``ca.key``)."""
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_private(folder / "ca.key", key_pem(key))
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    hosts: list[str] | None = None,
    client: bool = False,
    days: int = SERVER_DAYS,
    not_before: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for ``common_name`` signed by the CA: a server's (``hosts`` in its
    subject alternative names) or, with ``client``, a device's."""
    key = _new_key()
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(_subject_alt_names(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def self_signed(
    common_name: str, *, days: int = SERVER_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed client certificate for a device (``auth.type`` x509_self_signed)."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    return cert, key


def _server_cert_fits(path: Path, hosts: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE < dt.datetime.now(dt.UTC):
        return False
    return set(_subject_alt_names(hosts)) <= set(names)


def ensure_local_ca(folder: Path, hosts: list[str] | None = None) -> TlsFiles:
    """The CA and the server certificate in ``folder``, made or renewed as needed."""
    hosts = hosts or machine_names()
    files = TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    loaded = _load_ca(folder)
    if loaded is None or loaded[0].not_valid_after_utc - RENEW_BEFORE < dt.datetime.now(dt.UTC):
        loaded = make_ca(folder)
        files.server_cert.unlink(missing_ok=True)
    if not (_server_cert_fits(files.server_cert, hosts) and files.server_key.exists()):
        cert, key = issue(*loaded, hosts[0], hosts=hosts)
        write_private(files.server_key, key_pem(key))
        files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files

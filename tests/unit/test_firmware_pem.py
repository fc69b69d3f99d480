"""The firmware's PEM reader (firmware/common/fleetline_umqtt.py), under CPython: the
unix port's mbedtls takes DER only, so the board converts what it is given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fleetline_dev.certs import cert_pem, key_pem, self_signed

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "firmware" / "common"))
import fleetline_umqtt  # noqa: E402


def test_der_takes_the_certificate_or_the_key_block() -> None:
    cert, key = self_signed("dev-1")
    der_cert = cert.public_bytes(serialization.Encoding.DER)
    assert fleetline_umqtt.der(cert_pem(cert)) == der_cert
    assert fleetline_umqtt.der(der_cert) == der_cert  # DER stays as it is
    der_key = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    assert fleetline_umqtt.der(key_pem(key)) == der_key
    # `openssl ecparam -genkey` writes the curve's parameters before the key.
    made = subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey"],
                          capture_output=True, check=True).stdout
    assert made.startswith(b"-----BEGIN EC PARAMETERS-----")
    sec1 = serialization.load_pem_private_key(made, None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    assert fleetline_umqtt.der(made) == sec1
    with pytest.raises(ValueError, match="no certificate or private key"):
        fleetline_umqtt.der(b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n"
                            b"-----END EC PARAMETERS-----\n")

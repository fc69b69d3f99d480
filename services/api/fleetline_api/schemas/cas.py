"""X.509 CA certificates (routes/cas.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fleetline.certificates import MAX_PEM_CHARS
from fleetline_api.schemas.common import DeviceId

Pem = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PEM_CHARS)]


# A CA certificate (self-signed, P-256), as an example.
_EXAMPLE_PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBKjCB0qADAgECAgEBMAoGCCqGSM49BAMCMBUxEzARBgNVBAMMCmZhY3Rvcnkt\n"
    "Y2EwHhcNMjYwMTAxMDAwMDAwWhcNMzUxMjMwMDAwMDAwWjAVMRMwEQYDVQQDDApm\n"
    "YWN0b3J5LWNhMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEy4sK14WYOXbmMgDw\n"
    "m150tKt1mr42dJPs0hQesOXcgewYpp/DGuWBeGZvMQcXvhRNarlG+I8Vt1emFRQE\n"
    "oHYBQ6MTMBEwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiBJeA0f\n"
    "v/1ZtftlyftEddDSUxGBJms7c19Ab9mEXnl1oQIgGp6Bp0/I5B+L/p6vdbLapSo+\n"
    "n9C2cMTpgS1BkI0uKsM=\n"
    "-----END CERTIFICATE-----\n"
)


class CaCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "factory-ca",
                    "certificate": _EXAMPLE_PEM,
                }
            ]
        },
    )

    name: DeviceId
    certificate: Pem = Field(description="The CA certificate, PEM")


class CaProof(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"certificate": _EXAMPLE_PEM}]},
    )

    certificate: Pem = Field(
        description="PEM of a certificate signed with the CA's key whose common name is "
        "the verification code"
    )


# The example CA once verified (the certificate above: its subject, SHA-256 and expiry).
CA_EXAMPLE: dict[str, Any] = {
    "name": "factory-ca",
    "subject": "CN=factory-ca",
    "thumbprint": "e4e716786e4c042b271e7cc361a705a4664057159452fdaa8d5b8c9fd425ceb4",
    "not_after": "2035-12-30T00:00:00Z",
    "verified": True,
    "verification_code": None,
    "verified_at": "2026-11-25T14:31:02.310Z",
    "created_at": "2026-11-25T14:25:45.049Z",
}


class CaPublic(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                CA_EXAMPLE,
                {
                    # Just added: not trusted until verified.
                    **CA_EXAMPLE,
                    "verified": False,
                    "verification_code": "9c41d0e8a7b35f26e1c04d9b7a6f2e83",
                    "verified_at": None,
                },
            ]
        }
    )
    name: str
    subject: str
    thumbprint: str = Field(description="SHA-256 of the certificate's DER, lower-case hex")
    not_after: datetime
    verified: bool = Field(description="Devices' certificates it signed are trusted")
    verification_code: str | None = Field(
        description="Sign a certificate with this common name to verify (null once verified)"
    )
    verified_at: datetime | None
    created_at: datetime


class CaList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [CA_EXAMPLE]}]})
    items: list[CaPublic]

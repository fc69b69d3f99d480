"""X.509 CA certificates (routes/cas.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

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


class CaPublic(BaseModel):
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
    items: list[CaPublic]

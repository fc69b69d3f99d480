"""X.509 CA certificates whose signed device certificates the broker trusts.

A CA is registered with its certificate and is trusted only once verified: its owner
signs a certificate whose common name is the verification code with the CA's key
(proof of possession) and posts it to ``/verify``. Devices registered with
``auth.type = x509_ca`` then log in with a certificate the CA signed whose common name is
their id. Deleting a CA disconnects the devices that logged in through it.
"""

from __future__ import annotations

import secrets

import asyncpg
from cryptography.x509 import Certificate
from fastapi import APIRouter, HTTPException, Response

from fleetline import certificates
from fleetline_api.deps import DevicesRead, DevicesWrite, PoolDep
from fleetline_api.problems import NOT_FOUND, RESPONSES, Problem
from fleetline_api.queries import cas as sql
from fleetline_api.schemas.cas import CaCreate, CaList, CaProof, CaPublic
from fleetline_api.schemas.common import DeviceId

router = APIRouter(prefix="/v1/cas", tags=["certificate authorities"], responses=RESPONSES)


def _load(pem: str) -> Certificate:
    try:
        return certificates.load_pem(pem)
    except certificates.CertificateError as exc:
        raise HTTPException(400, str(exc)) from exc


@router.post(
    "",
    summary="Add an X.509 CA",
    status_code=201,
    response_model=CaPublic,
    responses={409: {"model": Problem, "description": "The name or certificate is registered"}},
)
async def create_ca(body: CaCreate, pool: PoolDep, _key: DevicesWrite) -> CaPublic:
    """Register a CA certificate. It is trusted once verified (``/verify``)."""
    cert = _load(body.certificate)
    try:
        certificates.check_ca(cert)
    except certificates.CertificateError as exc:
        raise HTTPException(400, str(exc)) from exc
    try:
        row = await pool.fetchrow(
            sql.INSERT_CA,
            body.name,
            body.certificate,
            certificates.thumbprint(cert),
            cert.subject.rfc4514_string(),
            cert.not_valid_after_utc,
            secrets.token_hex(16),
        )
    except asyncpg.UniqueViolationError as exc:
        raise HTTPException(409, "a CA with this name or certificate is registered") from exc
    assert row is not None  # INSERT ... RETURNING
    return CaPublic(**dict(row))


@router.get("", summary="List X.509 CAs", response_model=CaList)
async def list_cas(pool: PoolDep, _key: DevicesRead) -> CaList:
    """Every registered CA, verified or not."""
    return CaList(items=[CaPublic(**dict(r)) for r in await pool.fetch(sql.LIST_CAS)])


@router.get("/{name}", summary="Get an X.509 CA", response_model=CaPublic, responses=NOT_FOUND)
async def get_ca(name: DeviceId, pool: PoolDep, _key: DevicesRead) -> CaPublic:
    row = await pool.fetchrow(sql.GET_CA, name)
    if row is None:
        raise HTTPException(404, f"CA {name} not found")
    return CaPublic(**dict(row))


@router.post(
    "/{name}/verify",
    summary="Verify a CA (proof of possession)",
    response_model=CaPublic,
    responses=NOT_FOUND,
)
async def verify_ca(name: DeviceId, body: CaProof, pool: PoolDep, _key: DevicesWrite) -> CaPublic:
    """Prove possession of the CA's key: a certificate it signed whose common name is
    the verification code. The CA is trusted from now on."""
    proof = _load(body.certificate)
    async with pool.acquire() as con, con.transaction():
        row = await con.fetchrow(sql.CA_FOR_PROOF, name)
        if row is None:
            raise HTTPException(404, f"CA {name} not found")
        try:
            certificates.check_proof(
                certificates.load_pem(row["certificate"]), proof, row["verification_code"]
            )
        except certificates.CertificateError as exc:
            raise HTTPException(400, str(exc)) from exc
        row = await con.fetchrow(sql.VERIFY_CA, name)
        assert row is not None  # locked above
        return CaPublic(**dict(row))


@router.delete(
    "/{name}",
    summary="Delete an X.509 CA",
    status_code=204,
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "An enrollment's CA"}},
)
async def delete_ca(name: DeviceId, pool: PoolDep, _key: DevicesWrite) -> Response:
    """Stop trusting the CA: devices that logged in with a certificate it signed are
    disconnected within seconds."""
    try:
        deleted = await pool.execute(sql.DELETE_CA, name)
    except asyncpg.ForeignKeyViolationError as exc:
        raise HTTPException(
            409, f"CA {name} is the CA of an enrollment: delete the enrollment first"
        ) from exc
    if deleted == "DELETE 0":
        raise HTTPException(404, f"CA {name} not found")
    return Response(status_code=204)

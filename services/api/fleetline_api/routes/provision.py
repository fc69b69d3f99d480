"""``POST /v1/provision``: a device registers itself over HTTPS (provisioning.py).

No API key: the device proves its enrollment credential with a SAS token in
``Authorization: SharedAccessSignature sig=<base64>&se=<expiry>``, signing
``"{registration_id}\\n{expiry}"`` with the key it holds (a group's device:
HMAC-SHA256(enrollment key, registration id); an individual one: the enrollment key).
X.509 enrollments provision over MQTT, where the broker sees the client certificate.
Every refusal is problem+json: 401 for credentials (the same answer whatever was wrong,
the reason is logged), 403 for a registration the enrollment refuses, 429 over the
enrollment's rate or after ``FLEETLINE_API_PROVISION_FAILURES_BURST`` (10) failed attempts
from one address (then one a second). An attempt counts as failed while it is checked,
so that many attempts at once from one address are as many as it may make.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request

from fleetline import devicekeys
from fleetline_api.problems import RESPONSES, Problem
from fleetline_api.provisioning import FAILED, THROTTLED, Provisioner
from fleetline_api.schemas.enrollments import ProvisionAnswer, ProvisionRequest
from fleetline_api.waits import AUTH_TIMEOUT_SECONDS, within

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/provision", tags=["provisioning"], responses=RESPONSES)
SCHEME = "SharedAccessSignature "


async def _refused(provisioner: Provisioner, body: ProvisionRequest, token: str) -> str | None:
    """Why the token does not prove the enrollment's credential (None: it does)."""
    if not token.startswith("sig="):
        return "no SharedAccessSignature token"  # before any query: no work for nothing
    enrollment = await provisioner.enrollment(body.enrollment_id, body.registration_id)
    if enrollment is None:
        return "unknown enrollment"
    if enrollment["attestation"] != "symmetric_key":
        return "an X.509 enrollment provisions over MQTT"
    key = provisioner.registration_key(enrollment, body.registration_id)
    if not devicekeys.verify_password(key, body.registration_id, token):
        return "bad or expired token"
    return None


@router.post(
    "",
    summary="Register a device with an enrollment (SAS token)",
    response_model=ProvisionAnswer,
    responses={
        403: {"model": Problem, "description": "The enrollment refuses this registration"},
        429: {"model": Problem, "description": "Over the enrollment's registration rate"},
    },
)
async def provision(
    body: ProvisionRequest,
    request: Request,
    authorization: Annotated[str | None, Header(max_length=1024)] = None,
) -> ProvisionAnswer:
    """Register the device (idempotent): its device id, how it logs in and the MQTT
    endpoint."""
    provisioner: Provisioner = request.state.provisioner
    token = (
        authorization[len(SCHEME) :] if authorization and authorization.startswith(SCHEME) else ""
    )
    address = request.client.host if request.client else ""
    # A failure is counted before the credentials are checked and given back when they
    # pass: concurrent guesses cannot all pass one check.
    wait = provisioner.failures.take(address)
    if wait is not None:
        raise HTTPException(
            429,
            "too many failed provisioning attempts from this address",
            headers={"Retry-After": str(wait)},
        )
    try:
        reason = await within(AUTH_TIMEOUT_SECONDS, _refused(provisioner, body, token))
    except BaseException:  # not checked (the database did not answer): not a failure
        provisioner.failures.refund(address)
        raise
    if reason is None:
        provisioner.failures.refund(address)
    else:
        log.warning(
            "provisioning refused: %s",
            reason,
            extra={
                "enrollment_id": body.enrollment_id,
                "registration_id": body.registration_id,
                "client": address,
            },
        )
        raise HTTPException(
            401,
            "the provisioning credentials were refused",
            headers={"WWW-Authenticate": "SharedAccessSignature"},
        )
    outcome = await provisioner.register(body.enrollment_id, body.registration_id)
    if outcome.status == THROTTLED:
        raise HTTPException(
            429, outcome.error, headers={"Retry-After": str(outcome.retry_after_s or 1)}
        )
    if outcome.status == FAILED:
        raise HTTPException(403, outcome.error)
    return ProvisionAnswer(**outcome.as_json())

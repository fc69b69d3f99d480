"""``POST /v1/provision``: a device registers itself over HTTPS (provisioning.py).

No API key: the device proves its enrollment credential with a SAS token in
``Authorization: SharedAccessSignature sig=<base64>&se=<expiry>``, signing
``"{registration_id}\\n{expiry}"`` with the key it holds (a group's device:
HMAC-SHA256(enrollment key, registration id); an individual one: the enrollment key).
X.509 enrollments provision over MQTT, where the broker sees the client certificate.
Every refusal is problem+json: 401 for credentials (the same answer whatever was wrong,
the reason is logged), 403 for a registration the enrollment refuses, 429 over the
enrollment's rate.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request

from fleetline import devicekeys
from fleetline_api.problems import RESPONSES, Problem
from fleetline_api.provisioning import FAILED, THROTTLED, Provisioner
from fleetline_api.schemas.enrollments import ProvisionAnswer, ProvisionRequest

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/provision", tags=["provisioning"], responses=RESPONSES)
SCHEME = "SharedAccessSignature "


@router.post(
    "",
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
    enrollment = await provisioner.enrollment(body.enrollment_id, body.registration_id)
    reason = None
    if not token.startswith("sig="):
        reason = "no SharedAccessSignature token"
    elif enrollment is None:
        reason = "unknown enrollment"
    elif enrollment["attestation"] != "symmetric_key":
        reason = "an X.509 enrollment provisions over MQTT"
    elif not devicekeys.verify_password(
        provisioner.registration_key(enrollment, body.registration_id),
        body.registration_id,
        token,
    ):
        reason = "bad or expired token"
    if reason is not None:
        log.warning(
            "provisioning refused: %s",
            reason,
            extra={
                "enrollment_id": body.enrollment_id,
                "registration_id": body.registration_id,
                "client": request.client.host if request.client else None,
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

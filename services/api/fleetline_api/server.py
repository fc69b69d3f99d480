"""The API's HTTP server: uvicorn, with its protocol-level errors as problem+json.

A request uvicorn cannot parse (malformed, or a header block still incomplete past four
times ``FLEETLINE_API_MAX_HEADER_BYTES``) never reaches the application: uvicorn answers
it with its own ``400 text/plain``. :class:`ProblemH11Protocol` answers it as every other
error, RFC 9457 problem+json. uvicorn is pinned exactly in pyproject.toml: this overrides
``H11Protocol.send_400_response``.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fleetline_api.problems import MEDIA_TYPE, problem_body


class ProblemH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = problem_body(400, f"{msg.rstrip('.')}: malformed, or headers too large")
        headers = [
            (b"content-type", MEDIA_TYPE.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"x-content-type-options", b"nosniff"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

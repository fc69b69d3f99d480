"""``/v1/query`` (routes/query.py): the devices a device query matches, with their twins."""

from __future__ import annotations

from fleetline import devicequery

# $1 cursor, $2 limit + 1, the query's own parameters from $3.
SELECT_MATCHES = """
SELECT d.id AS device_id, d.tags, coalesce(a.online, false) AS online, a.last_seen,
       coalesce(td.desired, '{{}}'::jsonb) AS desired, coalesce(td.version, 0) AS desired_version,
       coalesce(tr.reported, '{{}}'::jsonb) AS reported,
       coalesce(tr.version, 0) AS reported_version
FROM {from_} WHERE ({where}) AND ($1::text IS NULL OR d.id > $1)
ORDER BY d.id LIMIT $2
"""


def select_matches(where: str) -> str:
    """SELECT_MATCHES for a compiled query's condition (its parameters from $3)."""
    return SELECT_MATCHES.format(from_=devicequery.DEVICE_FROM, where=where)

"""The device registry (routes/devices.py), the registered-device checks (deps.py) and the
device filter several routes share (params.py)."""

from __future__ import annotations

from typing import Any

SELECT_DEVICE = """
SELECT d.id, d.tags, d.created_at, coalesce(a.online, false) AS online, a.last_seen,
       a.status_changed_at, d.key_version, d.key_created_at, d.enabled,
       jsonb_build_object('type', d.auth,
                          'primary_thumbprint', encode(d.primary_thumbprint, 'hex'),
                          'secondary_thumbprint', encode(d.secondary_thumbprint, 'hex'),
                          'ca', d.ca_name) AS auth,
       d.gateway, d.parent_id AS parent, a.offline_reason
FROM devices d LEFT JOIN device_activity a ON a.device_id = d.id
"""
SELECT_DEVICE_BY_ID = SELECT_DEVICE + "WHERE d.id = $1"


def device_conditions(
    tags: dict[str, str], status: str | None, cursor: str | None, *, first: int
) -> tuple[str, list[Any]]:
    """SQL conditions on devices ``d`` (with their activity ``a``) and their parameters,
    numbered from ``$first``: the tags a device holds (none: any), its connection status
    (``online``, ``offline``; None: any), and the page after ``cursor``."""
    t, s, c = first, first + 1, first + 2
    sql = (
        f"(${t}::jsonb IS NULL OR d.tags @> ${t}::jsonb)"
        f" AND (${s}::bool IS NULL OR coalesce(a.online, false) = ${s})"
        f" AND (${c}::text IS NULL OR d.id > ${c})"
    )
    return sql, [tags or None, None if status is None else status == "online", cursor]


def list_devices(conditions: str) -> str:
    """A page of devices by id: ``conditions`` from :func:`device_conditions` (``$1`` to
    ``$3``), ``$4`` limit + 1, ``$5`` their gateway (None: any)."""
    return (
        f"{SELECT_DEVICE} WHERE {conditions} AND ($5::text IS NULL OR d.parent_id = $5) "
        "ORDER BY d.id LIMIT $4"
    )


def count_devices(conditions: str) -> str:
    """How many devices match ``conditions`` (from :func:`device_conditions`, ``$1`` to
    ``$3``) and are behind the gateway ``$4`` (None: any), and how many are online."""
    return (
        "SELECT count(*) AS total, count(*) FILTER (WHERE a.online) AS online "
        "FROM devices d LEFT JOIN device_activity a ON a.device_id = d.id "
        f"WHERE {conditions} AND ($4::text IS NULL OR d.parent_id = $4)"
    )


INSERT_DEVICE = """
INSERT INTO devices (id, tags, enabled, auth, primary_thumbprint, secondary_thumbprint,
                     ca_name, gateway, parent_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
"""
# A gateway (locked while a child is put behind it); None: no such gateway.
LOCK_GATEWAY = "SELECT gateway IS NOT NULL FROM devices WHERE id = $1 FOR KEY SHARE"
# The device's (locked by the caller) place among gateways: whether it is one, its
# parent, whether it has children.
FAMILY = """
SELECT gateway IS NOT NULL AS is_gateway, parent_id,
       EXISTS (SELECT 1 FROM devices c WHERE c.parent_id = $1) AS has_children
FROM devices WHERE id = $1
"""
SET_GATEWAY = "UPDATE devices SET gateway = $2, updated_at = now() WHERE id = $1"
SET_PARENT = "UPDATE devices SET parent_id = $2, updated_at = now() WHERE id = $1"
# What the broker refused a gateway, by child (the plugin adds to it).
GATEWAY_REFUSALS = """
SELECT child_id, reason, topic, count, first_refused_at, last_refused_at
FROM gateway_refusals WHERE gateway_id = $1
ORDER BY last_refused_at DESC, child_id LIMIT $2
"""
# Leaving "key" retires the key (version 0): coming back needs a new one, never the old.
SET_AUTH = """
UPDATE devices SET auth = $2, primary_thumbprint = $3, secondary_thumbprint = $4,
                   ca_name = $5,
                   key_version = CASE WHEN $2 = 'key' THEN key_version ELSE 0 END,
                   key_sha256 = CASE WHEN $2 = 'key' THEN key_sha256 END,
                   updated_at = now()
WHERE id = $1
"""
CA_EXISTS = "SELECT EXISTS (SELECT 1 FROM x509_cas WHERE name = $1)"
SET_ENABLED = "UPDATE devices SET enabled = $2, updated_at = now() WHERE id = $1"
# Issue a new key version, never used before by any device (a device deleted and
# registered again must not get its old key back); None when the device does not exist.
ISSUE_KEY = """
UPDATE devices SET key_version = nextval('device_key_version_seq'), key_created_at = now(),
                   updated_at = now()
WHERE id = $1 RETURNING key_version
"""
STORE_FINGERPRINT = "UPDATE devices SET key_sha256 = $3 WHERE id = $1 AND key_version = $2"
KEY_VERSION = "SELECT key_version FROM devices WHERE id = $1"
# Merge-patch the tags ($2; null removes one), unless the device would hold more than $3:
# then no row.
MERGE_TAGS = """
WITH merged AS (
    SELECT id, jsonb_strip_nulls(tags || $2::jsonb) AS tags FROM devices WHERE id = $1
)
UPDATE devices d SET tags = m.tags, updated_at = now() FROM merged m
WHERE d.id = m.id AND (SELECT count(*) FROM jsonb_object_keys(m.tags)) <= $3
RETURNING d.tags
"""
DELETE_MODULES = "DELETE FROM device_modules WHERE device_id = $1 RETURNING module_id"
DELETE_DEVICE = "DELETE FROM devices WHERE id = $1"

# deps.require_device: whether the device is registered.
DEVICE_EXISTS = "SELECT EXISTS (SELECT 1 FROM devices WHERE id = $1)"
# deps.lock_device: writers of the device and of what belongs to it take turns.
LOCK_DEVICE = "SELECT 1 FROM devices WHERE id = $1 FOR UPDATE"

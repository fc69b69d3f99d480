-- The device registry and each device's activity.
--
-- `devices` is configuration and is written by the api service. `device_activity` is
-- written only by ingest (last seen, the online/offline status from the status topic
-- and its Last Will), so the two services never contend for the same rows. Activity
-- has no foreign key to `devices`: the broker's credentials and ACLs decide who may
-- publish, and a reading must never be refused because registration raced it.

CREATE TABLE devices (
    id          TEXT PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    tags        JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX devices_tags_idx ON devices USING gin (tags jsonb_path_ops);

CREATE TABLE device_activity (
    device_id          TEXT PRIMARY KEY,
    last_seen          TIMESTAMPTZ NOT NULL,
    online             BOOLEAN,
    status_changed_at  TIMESTAMPTZ
);

-- Stable SQL surface (PROTOCOL.md): one row per known device.
CREATE VIEW device_status AS
SELECT coalesce(d.id, a.device_id)          AS device_id,
       coalesce(a.online, false)            AS online,
       a.last_seen                          AS last_seen,
       coalesce(d.tags, '{}'::jsonb)        AS tags,
       a.status_changed_at                  AS status_changed_at
FROM devices d
FULL JOIN device_activity a ON a.device_id = d.id;

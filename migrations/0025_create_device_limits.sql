-- Per-device limits (docs/security.md): messages and bytes a second, with bursts, that
-- the broker's auth plugin lets a device publish. One row is the default; overrides
-- name a device or a tag value. A device gets its own override, else the first matching
-- tag override by tag name, else the default. The burst is what a device reconnecting
-- with a backlog may send at once; the bytes burst holds at least one packet of the
-- broker's largest (1 MiB), so every packet can pass once the device slows down.
CREATE TABLE device_limits (
    selector            TEXT PRIMARY KEY
        CHECK (selector = 'default' OR selector LIKE 'device:%' OR selector LIKE 'tag:%'),
    device_id           TEXT,
    tag_name            TEXT,
    tag_value           TEXT,
    messages_per_second REAL NOT NULL CHECK (messages_per_second > 0),
    burst_messages      INTEGER NOT NULL CHECK (burst_messages >= 1),
    bytes_per_second    REAL NOT NULL CHECK (bytes_per_second > 0),
    burst_bytes         BIGINT NOT NULL CHECK (burst_bytes >= 1048576),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((selector = 'default') = (device_id IS NULL AND tag_name IS NULL)),
    CHECK (device_id IS NULL OR tag_name IS NULL),
    CHECK ((tag_name IS NULL) = (tag_value IS NULL))
);
INSERT INTO device_limits (selector, messages_per_second, burst_messages, bytes_per_second,
                           burst_bytes)
VALUES ('default', 20, 1000, 65536, 4194304);

-- The limits that apply to a device with these tags.
CREATE FUNCTION fleetline_limits_of(id TEXT, tags JSONB) RETURNS SETOF device_limits
LANGUAGE sql STABLE AS $$
    SELECT l.* FROM device_limits l
    WHERE l.device_id = id
       OR (l.tag_name IS NOT NULL AND tags ->> l.tag_name = l.tag_value)
       OR l.selector = 'default'
    ORDER BY (l.device_id IS NOT NULL) DESC, (l.tag_name IS NOT NULL) DESC, l.tag_name
    LIMIT 1
$$;

-- Publishes the plugin refused, per device, added every few seconds.
CREATE TABLE device_limit_refusals (
    device_id        TEXT PRIMARY KEY,
    messages         BIGINT NOT NULL DEFAULT 0,
    bytes            BIGINT NOT NULL DEFAULT 0,
    first_refused_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_refused_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The plugin re-reads the limits of connected devices when they (or tags) change.
CREATE FUNCTION fleetline_device_limits_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fleetline_device_limits', '');
    RETURN NULL;
END $$;

CREATE TRIGGER device_limits_changed
AFTER INSERT OR UPDATE OR DELETE ON device_limits
FOR EACH STATEMENT EXECUTE FUNCTION fleetline_device_limits_changed();
-- Tags matter only while some override names a tag.
CREATE FUNCTION fleetline_device_tags_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM device_limits WHERE tag_name IS NOT NULL) THEN
        PERFORM pg_notify('fleetline_device_limits', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER devices_tags_changed
AFTER UPDATE OF tags ON devices
FOR EACH STATEMENT EXECUTE FUNCTION fleetline_device_tags_changed();

-- Gateways (docs/gateways.md): a device that publishes for its children over its own
-- connection, on each child's own devices/{child}/ topics.
--
-- devices.gateway    NULL: not a gateway. Else its policy for children it publishes for
--                    that the registry does not know yet: {"create_children": bool,
--                    "child_id_pattern": "<PostgreSQL regex the whole id must match>",
--                    "child_tags": {...}, "max_children": n} (the API writes every
--                    member).
-- devices.parent_id  the gateway a child is behind (NULL: a device of its own). Only a
--                    gateway is a parent and a gateway has no parent (the API checks
--                    both, under the rows' locks). Deleting a gateway leaves its children
--                    without one.
--
-- The broker's auth plugin allows a gateway on a child's topics when the child's parent
-- is the gateway; it learns of a changed parent on its own channel (a child connected
-- itself stays connected). Becoming a gateway or stopping being one changes what the
-- device's login may do: it counts as a credential change (the plugin disconnects it,
-- and its next login says what it is).
ALTER TABLE devices
    ADD COLUMN gateway JSONB CHECK (gateway IS NULL OR jsonb_typeof(gateway) = 'object'),
    ADD COLUMN parent_id TEXT REFERENCES devices (id) ON DELETE SET NULL
        CHECK (parent_id <> id);
CREATE INDEX devices_parent_idx ON devices (parent_id) WHERE parent_id IS NOT NULL;

CREATE FUNCTION fleetline_device_parent_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fleetline_device_parent', NEW.id);
    RETURN NULL;
END $$;

CREATE TRIGGER devices_parent_changed
AFTER UPDATE OF parent_id ON devices
FOR EACH ROW WHEN (OLD.parent_id IS DISTINCT FROM NEW.parent_id)
EXECUTE FUNCTION fleetline_device_parent_changed();

CREATE OR REPLACE FUNCTION fleetline_count_credentials() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.key_version, NEW.enabled, NEW.auth, NEW.primary_thumbprint,
        NEW.secondary_thumbprint, NEW.ca_name, NEW.gateway IS NULL)
       IS DISTINCT FROM (OLD.key_version, OLD.enabled, OLD.auth, OLD.primary_thumbprint,
                         OLD.secondary_thumbprint, OLD.ca_name, OLD.gateway IS NULL) THEN
        NEW.credentials_version := OLD.credentials_version + 1;
    END IF;
    RETURN NEW;
END $$;

-- Why a device is offline when it did not say so itself: its gateway went offline.
-- Ingest clears it with every status it writes.
ALTER TABLE device_activity ADD COLUMN offline_reason TEXT;

-- When a gateway goes offline, so do its children that were online, with the reason.
-- Their own status afterwards (the gateway back, reporting them) is newer and wins.
CREATE FUNCTION fleetline_gateway_offline() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE device_activity a
    SET online = false,
        offline_reason = format('gateway %L offline', NEW.device_id),
        status_changed_at = NEW.status_changed_at
    FROM devices d
    WHERE d.parent_id = NEW.device_id AND a.device_id = d.id AND a.online
      AND (a.status_changed_at IS NULL OR a.status_changed_at <= NEW.status_changed_at);
    RETURN NULL;
END $$;

CREATE TRIGGER device_activity_gateway_offline
AFTER UPDATE OF online ON device_activity
FOR EACH ROW WHEN (OLD.online AND NOT NEW.online)
EXECUTE FUNCTION fleetline_gateway_offline();

-- The broker's plugin asks this when a gateway uses the topics of a device whose parent
-- it does not know: the device's parent, and why the gateway may not (NULL: it may). An
-- unknown id the gateway's policy lets it create (may_create: a publish or subscription,
-- never a delivery), inside its pattern and its number of children, becomes its child
-- here. It runs as its owner (the plugin's role may only read devices), so only the
-- broker's role may call it, with a search path no caller can put a table in front of,
-- and it waits for a lock 100 ms at most (the broker's one thread waits for it).
CREATE FUNCTION fleetline_gateway_child(gateway_id TEXT, child_id TEXT, may_create BOOLEAN,
                                        OUT parent TEXT, OUT refusal TEXT)
LANGUAGE plpgsql SECURITY DEFINER SET lock_timeout = '100ms' AS $$
DECLARE
    policy JSONB;
    enabled BOOLEAN;
    most INTEGER;
BEGIN
    FOR attempt IN 1..2 LOOP
        SELECT d.parent_id, d.enabled INTO parent, enabled FROM devices d WHERE d.id = child_id;
        IF FOUND THEN
            IF parent IS NULL THEN
                refusal := format('%L is not a child of %L', child_id, gateway_id);
            ELSIF parent <> gateway_id THEN
                refusal := format('%L is a child of %L', child_id, parent);
            ELSIF NOT enabled THEN
                refusal := format('%L is disabled', child_id);
            END IF;
            RETURN;
        END IF;
        IF NOT may_create THEN
            refusal := format('%L is not a child of %L', child_id, gateway_id);
            RETURN;
        END IF;
        SELECT d.gateway INTO policy FROM devices d
        WHERE d.id = gateway_id AND d.gateway IS NOT NULL FOR KEY SHARE;
        IF policy IS NULL OR NOT coalesce((policy ->> 'create_children')::boolean, false) THEN
            refusal := format('%L is not a child of %L', child_id, gateway_id);
            RETURN;
        END IF;
        IF child_id !~ ('^(?:' || coalesce(policy ->> 'child_id_pattern', '.*') || ')$') THEN
            refusal := format('%L is outside the child id pattern of %L', child_id, gateway_id);
            RETURN;
        END IF;
        IF child_id !~ '^[A-Za-z0-9_.:-]{1,128}$' OR child_id IN ('.', '..') THEN
            refusal := format('%L is not a valid device id', child_id);
            RETURN;
        END IF;
        most := coalesce((policy ->> 'max_children')::integer, 1000);
        IF (SELECT count(*) FROM devices d WHERE d.parent_id = gateway_id) >= most THEN
            refusal := format('%L has %s children, its most', gateway_id, most);
            RETURN;
        END IF;
        INSERT INTO devices (id, tags, parent_id)
        VALUES (child_id, coalesce(policy -> 'child_tags', '{}'::jsonb), gateway_id)
        ON CONFLICT (id) DO NOTHING;
        IF FOUND THEN
            parent := gateway_id;
            RETURN;
        END IF;
        -- Registered meanwhile by someone else: decide on that row.
    END LOOP;
    refusal := format('%L is not a child of %L', child_id, gateway_id);
END $$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION fleetline_gateway_child(text, text, boolean) '
                   'SET search_path = pg_catalog, %I, pg_temp', current_schema());
END $$;
REVOKE EXECUTE ON FUNCTION fleetline_gateway_child(text, text, boolean) FROM PUBLIC;

-- What the broker refused gateways, by child: the plugin adds its counts every few
-- seconds (with the latest reason and topic).
CREATE TABLE gateway_refusals (
    gateway_id       TEXT NOT NULL,
    child_id         TEXT NOT NULL,
    reason           TEXT NOT NULL,
    topic            TEXT NOT NULL,
    count            BIGINT NOT NULL DEFAULT 0,
    first_refused_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_refused_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, child_id)
);

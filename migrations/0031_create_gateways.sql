-- Gateways (docs/gateways.md): a device that publishes for its children over its own
-- connection, on each child's own devices/{child}/ topics.
--
-- devices.gateway    NULL: not a gateway. Else its policy for children it publishes for
--                    that the registry does not know yet: {"create_children": bool,
--                    "child_id_pattern": "<PostgreSQL regex the whole id must match>",
--                    "child_tags": {...}} (the API writes every member).
-- devices.parent_id  the gateway a child is behind (NULL: a device of its own). Only a
--                    gateway is a parent and a gateway has no parent (the API checks
--                    both, under the rows' locks). Deleting a gateway leaves its children
--                    without one.
--
-- The broker's auth plugin allows a gateway on a child's topics when the child's parent
-- is the gateway; it learns of a changed parent through the credentials channel (without
-- a new credentials_version: a child connected itself stays connected).
ALTER TABLE devices
    ADD COLUMN gateway JSONB CHECK (gateway IS NULL OR jsonb_typeof(gateway) = 'object'),
    ADD COLUMN parent_id TEXT REFERENCES devices (id) ON DELETE SET NULL
        CHECK (parent_id <> id);
CREATE INDEX devices_parent_idx ON devices (parent_id) WHERE parent_id IS NOT NULL;

CREATE TRIGGER devices_parent_changed
AFTER UPDATE OF parent_id ON devices
FOR EACH ROW WHEN (OLD.parent_id IS DISTINCT FROM NEW.parent_id)
EXECUTE FUNCTION fleetline_device_credentials_changed();

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
-- unknown id the gateway's policy lets it create, inside its pattern, becomes its child
-- here (security definer: the plugin's role may only read devices).
CREATE FUNCTION fleetline_gateway_child(gateway_id TEXT, child_id TEXT,
                                        OUT parent TEXT, OUT refusal TEXT)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    policy JSONB;
BEGIN
    FOR attempt IN 1..2 LOOP
        SELECT d.parent_id INTO parent FROM devices d WHERE d.id = child_id;
        IF FOUND THEN
            IF parent IS NULL THEN
                refusal := format('%L is not a child of %L', child_id, gateway_id);
            ELSIF parent <> gateway_id THEN
                refusal := format('%L is a child of %L', child_id, parent);
            END IF;
            RETURN;
        END IF;
        SELECT d.gateway INTO policy FROM devices d
        WHERE d.id = gateway_id AND d.gateway IS NOT NULL FOR SHARE;
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

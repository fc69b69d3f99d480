-- Modules (PROTOCOL.md): named parts of a device's software, `{device_id}/{module_id}`,
-- each with its own twin and methods. A module speaks over its device's connection and
-- credentials, under `devices/{id}/modules/{module_id}/`.
--
-- A twin is now keyed by (device_id, module_id); the device's own twin has module_id ''.
-- Deleting a module deletes its twin rows (trigger); deleting a device deletes its
-- modules and twins (foreign keys).
--
-- Rolling over from the previous release: the API's twin PATCH of that release names
-- the old primary key (ON CONFLICT (device_id)) and fails until its replicas are
-- replaced; rebuilding the two primary keys locks the twin tables for as long as that
-- takes (one row per device: well under a second for 100,000 devices).

CREATE TABLE device_modules (
    device_id   TEXT NOT NULL REFERENCES devices ON DELETE CASCADE,
    module_id   TEXT NOT NULL CHECK (module_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, module_id)
);

ALTER TABLE twin_desired ADD COLUMN module_id TEXT NOT NULL DEFAULT '';
ALTER TABLE twin_desired DROP CONSTRAINT twin_desired_pkey;
ALTER TABLE twin_desired ADD PRIMARY KEY (device_id, module_id);

ALTER TABLE twin_reported ADD COLUMN module_id TEXT NOT NULL DEFAULT '';
ALTER TABLE twin_reported DROP CONSTRAINT twin_reported_pkey;
ALTER TABLE twin_reported ADD PRIMARY KEY (device_id, module_id);

CREATE FUNCTION fleetline_drop_module_twin() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM twin_desired WHERE device_id = OLD.device_id AND module_id = OLD.module_id;
    DELETE FROM twin_reported WHERE device_id = OLD.device_id AND module_id = OLD.module_id;
    RETURN NULL;
END
$$;
CREATE TRIGGER device_modules_drop_twin AFTER DELETE ON device_modules
FOR EACH ROW EXECUTE FUNCTION fleetline_drop_module_twin();

-- As 0014's, with each patch's module ('' for the device itself): a module's patch is
-- applied only while the module is registered (its row locked FOR KEY SHARE, as the
-- device's is). 0014's four-argument form stays, for the device's own twin, so that
-- ingest replicas of the previous release keep working while a deployment rolls over.
CREATE FUNCTION fleetline_apply_reported(
    devices_ text[], modules_ text[], patches jsonb[], received timestamptz[], max_bytes integer
) RETURNS TABLE (idx integer, reason text)
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    merged jsonb;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(devices_), 0) LOOP
        PERFORM 1 FROM devices d WHERE d.id = devices_[i] FOR KEY SHARE;
        IF NOT FOUND THEN
            idx := i;
            reason := 'twin patch for a device that is not registered';
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF modules_[i] <> '' THEN
            PERFORM 1 FROM device_modules m
            WHERE m.device_id = devices_[i] AND m.module_id = modules_[i] FOR KEY SHARE;
            IF NOT FOUND THEN
                idx := i;
                reason := format('twin patch for module %s, which is not registered', modules_[i]);
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        INSERT INTO twin_reported (device_id, module_id) VALUES (devices_[i], modules_[i])
        ON CONFLICT (device_id, module_id) DO NOTHING;
        SELECT fleetline_merge_patch(r.reported, patches[i]) INTO merged
        FROM twin_reported r
        WHERE r.device_id = devices_[i] AND r.module_id = modules_[i] FOR UPDATE;
        IF octet_length(merged::text) > max_bytes THEN
            idx := i;
            reason := format('reported document would be %s bytes, more than %s',
                             octet_length(merged::text), max_bytes);
            RETURN NEXT;
        ELSE
            UPDATE twin_reported
            SET reported = merged, version = version + 1, updated_at = received[i]
            WHERE device_id = devices_[i] AND module_id = modules_[i];
        END IF;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION fleetline_apply_reported(
    devices_ text[], patches jsonb[], received timestamptz[], max_bytes integer
) RETURNS TABLE (idx integer, reason text)
LANGUAGE sql AS $$
    SELECT * FROM fleetline_apply_reported(
        devices_, array_fill(''::text, ARRAY[coalesce(cardinality(devices_), 0)]),
        patches, received, max_bytes
    )
$$;

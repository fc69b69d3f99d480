-- Merges reported twin patches (ingest, in a batch's transaction), each only while its
-- device (and module, '' for the device itself) is registered; returns the refused ones
-- with the reason. The four-argument form is the device-only form of the release before
-- modules, kept for its ingest replicas during a rolling upgrade. (Created by 0013,
-- last changed by 0018.)
-- revision: 1
CREATE OR REPLACE FUNCTION fleetline_apply_reported(
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

-- fleetline_apply_reported (0013) inserted a twin row for a device a concurrent DELETE
-- was removing; the foreign key then failed the whole ingest batch, which fell back to
-- writing message by message. Lock the device row first (FOR KEY SHARE: a delete waits
-- for the batch, or the batch sees the device gone), so a deleted device's patch is
-- refused like any unregistered device's.
CREATE OR REPLACE FUNCTION fleetline_apply_reported(
    devices_ text[], patches jsonb[], received timestamptz[], max_bytes integer
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
        INSERT INTO twin_reported (device_id) VALUES (devices_[i])
        ON CONFLICT (device_id) DO NOTHING;
        SELECT fleetline_merge_patch(r.reported, patches[i]) INTO merged
        FROM twin_reported r WHERE r.device_id = devices_[i] FOR UPDATE;
        IF octet_length(merged::text) > max_bytes THEN
            idx := i;
            reason := format('reported document would be %s bytes, more than %s',
                             octet_length(merged::text), max_bytes);
            RETURN NEXT;
        ELSE
            UPDATE twin_reported
            SET reported = merged, version = version + 1, updated_at = received[i]
            WHERE device_id = devices_[i];
        END IF;
    END LOOP;
END
$$;

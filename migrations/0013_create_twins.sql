-- Device twins (PROTOCOL.md): desired properties, set over REST, and reported
-- properties, sent by the device on `devices/{id}/twin/reported`.
--
-- Two tables, one writer each (STYLE §2): the api service writes `twin_desired`, ingest
-- writes `twin_reported`. Each side keeps its own version and time of last change, so
-- neither service ever waits on the other's row locks, and a burst of reported patches
-- cannot make a PATCH of desired properties fail its If-Match check. A device without a
-- row has an empty document at version 0 on that side.
--
-- Both reference `devices` with ON DELETE CASCADE: a deleted device's twin goes with it,
-- and one registered again with the same id starts empty. Ingest applies a reported
-- patch only when the device is registered (otherwise it is dead-lettered), so the
-- foreign key does not reject its batches.

CREATE TABLE twin_desired (
    device_id          TEXT PRIMARY KEY REFERENCES devices ON DELETE CASCADE,
    desired            JSONB NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(desired) = 'object'),
    version            BIGINT NOT NULL DEFAULT 0,
    updated_at         TIMESTAMPTZ,
    -- The version last published (retained) to devices/{id}/twin/desired; behind
    -- `version` when the publish after a commit failed (the next PATCH republishes).
    published_version  BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE twin_reported (
    device_id   TEXT PRIMARY KEY REFERENCES devices ON DELETE CASCADE,
    reported    JSONB NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(reported) = 'object'),
    -- One more per applied patch. A QoS 1 redelivery (ingest acknowledges after commit)
    -- may apply a patch twice: the document is the same, the version counts it twice.
    version     BIGINT NOT NULL DEFAULT 0,
    updated_at  TIMESTAMPTZ
);

-- RFC 7396 JSON Merge Patch: apply `patch` to `target`. A patch that is not an object
-- replaces the target; in an object patch, null removes the member, an object merges
-- into the member (recursively, an absent or non-object member counting as {}), and
-- anything else replaces it. Used by the api (desired) and ingest (reported).
CREATE FUNCTION fleetline_merge_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    result jsonb;
    k text;
    v jsonb;
BEGIN
    IF patch IS NULL OR jsonb_typeof(patch) <> 'object' THEN
        RETURN patch;
    END IF;
    IF target IS NULL OR jsonb_typeof(target) <> 'object' THEN
        result := '{}'::jsonb;
    ELSE
        result := target;
    END IF;
    FOR k, v IN SELECT * FROM jsonb_each(patch) LOOP
        IF jsonb_typeof(v) = 'null' THEN
            result := result - k;
        ELSIF jsonb_typeof(v) = 'object' THEN
            result := jsonb_set(result, ARRAY[k], fleetline_merge_patch(result -> k, v), true);
        ELSE
            result := jsonb_set(result, ARRAY[k], v, true);
        END IF;
    END LOOP;
    RETURN result;
END
$$;

-- Apply reported patches in array order (ingest passes each device's patches in
-- arrival order, devices sorted by id so concurrent replicas lock rows in one order).
-- Returns the index and reason of each patch not applied: the device is not
-- registered, or the document would grow beyond `max_bytes` (as JSON text).
CREATE FUNCTION fleetline_apply_reported(
    devices_ text[], patches jsonb[], received timestamptz[], max_bytes integer
) RETURNS TABLE (idx integer, reason text)
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    merged jsonb;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(devices_), 0) LOOP
        INSERT INTO twin_reported (device_id)
        SELECT d.id FROM devices d WHERE d.id = devices_[i]
        ON CONFLICT (device_id) DO NOTHING;
        SELECT fleetline_merge_patch(r.reported, patches[i]) INTO merged
        FROM twin_reported r WHERE r.device_id = devices_[i] FOR UPDATE;
        IF NOT FOUND THEN
            idx := i;
            reason := 'twin patch for a device that is not registered';
            RETURN NEXT;
        ELSIF octet_length(merged::text) > max_bytes THEN
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

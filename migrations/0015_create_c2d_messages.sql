-- Cloud-to-device (C2D) messages: a persistent queue per device, with each message's
-- history (PROTOCOL.md: devices/{id}/c2d and devices/{id}/c2d/ack).
--
-- Who writes what:
--   c2d_messages        the api service: POST queues a message, its dispatcher moves it
--                       queued -> sent (and re-sends it), expires it, and a cancel moves it
--                       to cancelled. Ingest moves queued|sent -> completed|rejected when
--                       the device acknowledges it: the acknowledgement is a device
--                       message, and ingest alone reads device messages and acknowledges
--                       them to the broker only after their rows commit, so the ack is
--                       applied in ingest's batch transaction (fleetline_apply_c2d_acks).
--                       Every state change is a conditional UPDATE (WHERE state IN
--                       ('queued', 'sent')), so none overwrites a transition another made.
--                       The dispatcher claims messages for a lease (claimed_until) in a
--                       short transaction, under the device row's lock, and publishes after
--                       the commit: no row lock is held across network I/O (ingest's ack
--                       never waits for a broker), and API replicas never send one message
--                       at the same moment.
--   c2d_message_events  whoever moves a message, in the same transaction (history).
--
-- Both reference their parent with ON DELETE CASCADE: a deleted device's queue and history
-- go with it.

CREATE TABLE c2d_messages (
    -- Made by the API (uuid4): the id the device sees and acknowledges.
    id            UUID PRIMARY KEY,
    device_id     TEXT NOT NULL REFERENCES devices ON DELETE CASCADE,
    -- Creation order: messages go out in this order per device; also the list's cursor.
    seq           BIGINT GENERATED ALWAYS AS IDENTITY,
    body          JSONB NOT NULL,
    properties    JSONB NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(properties) = 'object'),
    state         TEXT NOT NULL DEFAULT 'queued'
                  CHECK (state IN ('queued', 'sent', 'completed', 'rejected', 'expired', 'cancelled')),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_by    TEXT,
    expires_at    TIMESTAMPTZ NOT NULL,
    -- First and latest delivery (publish to the broker, PUBACK received), and how many.
    sent_at       TIMESTAMPTZ,
    last_sent_at  TIMESTAMPTZ,
    deliveries    INTEGER NOT NULL DEFAULT 0,
    -- When it reached a final state (completed, rejected, expired, cancelled).
    finished_at   TIMESTAMPTZ,
    -- A dispatcher's lease: it is publishing the message (claimed, not yet marked sent).
    -- Other claims skip the device until then; a dispatcher that dies mid-publish leaves
    -- the message to be claimed again when the lease runs out.
    claimed_until TIMESTAMPTZ,
    CHECK ((finished_at IS NULL) = (state IN ('queued', 'sent')))
);
CREATE UNIQUE INDEX c2d_messages_seq_idx ON c2d_messages (seq);
-- The list of one device's messages, newest first.
CREATE INDEX c2d_messages_device_idx ON c2d_messages (device_id, seq);
-- A device's pending messages: queue depth, delivery in order, the dispatcher's sweep.
CREATE INDEX c2d_messages_pending_idx ON c2d_messages (device_id, seq)
    WHERE state IN ('queued', 'sent');
-- Expiry by time to live.
CREATE INDEX c2d_messages_expiry_idx ON c2d_messages (expires_at)
    WHERE state IN ('queued', 'sent');
-- Removal of finished messages after the retention.
CREATE INDEX c2d_messages_finished_idx ON c2d_messages (finished_at)
    WHERE finished_at IS NOT NULL;

CREATE TABLE c2d_message_events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id  UUID NOT NULL REFERENCES c2d_messages ON DELETE CASCADE,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The state the message entered; 'sent' again for every re-delivery.
    event       TEXT NOT NULL
                CHECK (event IN ('queued', 'sent', 'completed', 'rejected', 'expired', 'cancelled')),
    detail      TEXT
);
CREATE INDEX c2d_message_events_message_idx ON c2d_message_events (message_id, id);

-- Apply device acknowledgements (ingest), in array order (ingest passes each device's
-- acks in arrival order, devices sorted by id). A queued or sent message becomes
-- completed or rejected; an ack for a message already final is ignored (a QoS 1
-- redelivery, or an ack that came after expiry or cancellation). Returns the index and
-- reason of each ack that names no message of that device: ingest dead-letters those.
-- The device row is locked first (FOR KEY SHARE, as fleetline_apply_reported does): a
-- concurrent device delete waits for the batch, or the batch finds the messages gone.
CREATE FUNCTION fleetline_apply_c2d_acks(
    devices_ text[], ids uuid[], outcomes text[], received timestamptz[]
) RETURNS TABLE (idx integer, reason text)
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
    moved text;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(devices_), 0) LOOP
        PERFORM 1 FROM devices d WHERE d.id = devices_[i] FOR KEY SHARE;
        UPDATE c2d_messages m
        SET state = CASE outcomes[i] WHEN 'complete' THEN 'completed' ELSE 'rejected' END,
            finished_at = received[i]
        WHERE m.id = ids[i] AND m.device_id = devices_[i] AND m.state IN ('queued', 'sent')
        RETURNING m.state INTO moved;
        IF moved IS NOT NULL THEN
            INSERT INTO c2d_message_events (message_id, at, event, detail)
            VALUES (ids[i], received[i], moved,
                    CASE moved WHEN 'completed' THEN 'the device completed it'
                               ELSE 'the device rejected it' END);
        ELSIF NOT EXISTS (
            SELECT 1 FROM c2d_messages m WHERE m.id = ids[i] AND m.device_id = devices_[i]
        ) THEN
            idx := i;
            reason := format('c2d ack for message %s, which device %s does not have',
                             ids[i], devices_[i]);
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- A device came online (its `online` status, as ingest stores it): tell the API's
-- dispatchers, which send its queued messages and re-send the unacknowledged ones (the
-- device may have a clean session). Only when it has pending messages: most devices
-- have none, and a NOTIFY takes a database-wide lock at commit. `at` (this
-- transaction's start, the database clock) lets a dispatcher skip what another replica
-- re-sent after it. The WHEN clauses leave ingest's last-seen updates untouched: only a
-- new status message changes status_changed_at.
CREATE FUNCTION fleetline_c2d_device_online() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Set by ingest while PostgreSQL's NOTIFY queue is full: a notification would fail
    -- the whole batch, and the dispatchers' sweep finds the device within seconds.
    IF current_setting('fleetline.quiet', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF EXISTS (
        SELECT 1 FROM c2d_messages
        WHERE device_id = NEW.device_id AND state IN ('queued', 'sent')
    ) THEN
        PERFORM pg_notify(
            'fleetline_c2d', json_build_object('online', NEW.device_id, 'at', now())::text
        );
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER device_activity_c2d_online_insert
AFTER INSERT ON device_activity
FOR EACH ROW WHEN (NEW.online)
EXECUTE FUNCTION fleetline_c2d_device_online();

CREATE TRIGGER device_activity_c2d_online_update
AFTER UPDATE ON device_activity
FOR EACH ROW WHEN (NEW.online AND NEW.status_changed_at IS DISTINCT FROM OLD.status_changed_at)
EXECUTE FUNCTION fleetline_c2d_device_online();

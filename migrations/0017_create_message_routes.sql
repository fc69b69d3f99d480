-- Message routes: readings that match a device query (and optionally a metric
-- condition) are forwarded to a webhook or an MQTT topic.
--
-- Who writes what:
--   message_routes    the api service (REST /v1/routes). Every write also notifies the
--                     channel fleetline_routes in its transaction, so the rules service
--                     reloads its routes as soon as the change is committed.
--   route_deliveries  the rules service: enqueued in the transaction that lets it
--                     acknowledge the reading (so nothing it acknowledged is lost), then
--                     claimed, delivered and logged by its delivery worker, as
--                     action_deliveries (0010) are. The api deletes a route's pending
--                     rows with the route.

CREATE TABLE message_routes (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    enabled      BOOLEAN NOT NULL DEFAULT true,
    -- A device query (fleetline/devicequery.py); '' selects every registered device.
    query        TEXT NOT NULL DEFAULT '',
    metric       TEXT,
    -- {"op": ">", "value": 30} or {"op": "outside", "low": 1, "high": 9}, on `metric`.
    condition    JSONB,
    -- {"type": "webhook", "url": ..., "secret": ...} or {"type": "mqtt", "topic": ...}.
    -- The webhook secret lives here: the api never returns it.
    destination  JSONB NOT NULL,
    version      INTEGER NOT NULL DEFAULT 1,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (condition IS NULL OR metric IS NOT NULL),
    CHECK (destination ->> 'type' IN ('webhook', 'mqtt'))
);

-- One row per (route, reading) to forward: a durable queue and, once done, the log.
-- Claimed with FOR UPDATE SKIP LOCKED and a lease (locked_until), as action_deliveries:
-- at least once, and the delivery id travels with the message so receivers can drop a
-- repeat. No foreign key to message_routes: the rules service's batch (which also holds
-- alarm transitions) must not fail because a route was deleted a moment ago. Deleting a
-- route deletes its pending rows; one queued in that moment is deleted by the rules
-- service's cleanup, and finished rows age out with the log's retention.
CREATE TABLE route_deliveries (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    route_id         BIGINT NOT NULL,
    device_id        TEXT NOT NULL,
    ts               TIMESTAMPTZ NOT NULL,
    -- Identifies the reading for this route (a hash of device, ts and the metrics
    -- forwarded): a redelivered or re-sent reading is queued once (while its row is kept).
    reading_key      BYTEA NOT NULL,
    -- The values forwarded: {"metric": value, ...}.
    metrics          JSONB NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    locked_until     TIMESTAMPTZ,
    last_error       TEXT,
    response_status  INTEGER,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at     TIMESTAMPTZ
);
CREATE UNIQUE INDEX route_deliveries_reading_idx ON route_deliveries (route_id, reading_key);
-- The worker claims due rows route by route (a few per route, so a receiver that hangs
-- cannot take every delivery slot).
CREATE INDEX route_deliveries_due_idx ON route_deliveries (route_id, next_attempt_at, id)
    WHERE status = 'pending';
CREATE INDEX route_deliveries_route_idx ON route_deliveries (route_id, id);
-- Finished rows are deleted after the log's retention (the rules service, in chunks).
CREATE INDEX route_deliveries_done_idx ON route_deliveries (created_at)
    WHERE status <> 'pending';

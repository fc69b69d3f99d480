-- Rules, their runtime state, alarms with their history, and action deliveries.
--
-- Who writes what:
--   rules             the api service (REST /v1/rules). Every write also notifies the
--                     channel fleetline_rules in its transaction, so the rules service
--                     reloads as soon as the change is committed.
--   rule_state        the rules service (pending/clearing timers, last value for rate
--                     rules); the api deletes a rule's rows when the rule changes, so its
--                     timers restart under the new conditions.
--   rule_alarms       the rules service raises, updates and clears alarms; the api moves
--                     them on acknowledge and manual clear. Two writers because those
--                     moves are a person's decision that must be answered in the REST
--                     response (409 on an invalid transition), atomically with the check
--                     of the current state; routing them through the rules service would
--                     need a request/response channel for no gain. Both write with
--                     conditional UPDATEs (WHERE state = ...), so neither overwrites a
--                     transition the other made.
--   alarm_events      whoever moves an alarm, in the same transaction (history).
--   action_deliveries the rules service: enqueued in the transaction that raises or
--                     clears an alarm (so a crash cannot lose a notification), then
--                     claimed, executed and logged by its delivery worker.

CREATE TABLE rules (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- {"devices": [...], "tags": {...}}: a device matches when it is listed or carries
    -- all the tags; an empty match selects every device.
    match       JSONB NOT NULL DEFAULT '{}'::jsonb,
    kind        TEXT NOT NULL CHECK (kind IN ('threshold', 'no_data')),
    metric      TEXT,
    -- {"op": ">", "value": 30, "for_s": 60} (see fleetline/rules_engine.py)
    raise_condition  JSONB,
    -- NULL: the alarm clears when the raise condition no longer holds.
    clear_condition  JSONB,
    -- no_data rules: seconds without a reading before the device counts as offline.
    timeout_s   DOUBLE PRECISION CHECK (timeout_s > 0),
    severity    TEXT NOT NULL CHECK (severity IN ('critical', 'major', 'minor', 'warning', 'info')),
    message     TEXT NOT NULL DEFAULT '',
    -- Webhook secrets and Pushsafer keys live here: the api never returns them.
    actions     JSONB NOT NULL DEFAULT '[]'::jsonb,
    enabled     BOOLEAN NOT NULL DEFAULT true,
    -- Bumped on every update: the rules service drops its state of older versions.
    version     INTEGER NOT NULL DEFAULT 1,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((kind = 'threshold' AND metric IS NOT NULL AND raise_condition IS NOT NULL)
           OR (kind = 'no_data' AND timeout_s IS NOT NULL))
);

-- Timers that must survive a restart, per (rule, device). Only devices whose state is
-- not plain idle have a row (pending or clearing, or a rate rule's previous value).
-- Whether an alarm is active is not stored here: an open row in rule_alarms says so.
CREATE TABLE rule_state (
    rule_id     BIGINT NOT NULL REFERENCES rules (id) ON DELETE CASCADE,
    device_id   TEXT NOT NULL,
    phase       TEXT NOT NULL CHECK (phase IN ('idle', 'pending', 'active', 'clearing')),
    -- pending: since when the raise condition holds; clearing: the clear condition.
    since       TIMESTAMPTZ,
    -- The last reading evaluated (older ones are skipped) and, for rate rules, its value.
    last_ts     TIMESTAMPTZ,
    last_value  DOUBLE PRECISION,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (rule_id, device_id)
);

-- Alarms. No foreign key to rules: an alarm stays in the history after its rule is
-- deleted (rule_name keeps what it was called).
CREATE TABLE rule_alarms (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule_id          BIGINT NOT NULL,
    rule_name        TEXT NOT NULL,
    device_id        TEXT NOT NULL,
    metric           TEXT,
    severity         TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('active', 'acknowledged', 'cleared')),
    raised_at        TIMESTAMPTZ NOT NULL,
    acknowledged_at  TIMESTAMPTZ,
    acknowledged_by  TEXT,
    cleared_at       TIMESTAMPTZ,
    cleared_by       TEXT,
    -- The latest value, the most extreme one, and how many readings met the raise
    -- condition while the alarm was open (repeats update the alarm, never raise another).
    value            DOUBLE PRECISION,
    peak             DOUBLE PRECISION,
    count            BIGINT NOT NULL DEFAULT 1,
    message          TEXT NOT NULL DEFAULT '',
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((state = 'cleared') = (cleared_at IS NOT NULL))
);
-- One open alarm per (rule, device). The rules service inserts with ON CONFLICT on this
-- index, which is what keeps two replicas (or a replica restarted after kill -9 that
-- lost its memory) from raising the same alarm twice: the second raise becomes an
-- update of the first alarm's count and peak.
CREATE UNIQUE INDEX rule_alarms_one_open_idx ON rule_alarms (rule_id, device_id)
    WHERE state <> 'cleared';
CREATE INDEX rule_alarms_device_idx ON rule_alarms (device_id, id);
CREATE INDEX rule_alarms_rule_idx ON rule_alarms (rule_id, id);
CREATE INDEX rule_alarms_open_idx ON rule_alarms (id) WHERE state <> 'cleared';

-- Every move of an alarm: raised, acknowledged, cleared (who: actor, when: at).
CREATE TABLE alarm_events (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alarm_id   BIGINT NOT NULL REFERENCES rule_alarms (id) ON DELETE CASCADE,
    at         TIMESTAMPTZ NOT NULL,
    event      TEXT NOT NULL CHECK (event IN ('raised', 'acknowledged', 'cleared')),
    actor      TEXT,
    value      DOUBLE PRECISION,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX alarm_events_alarm_idx ON alarm_events (alarm_id, id);

-- Actions to run after an alarm moved: a durable queue and, once done, the log.
-- A row is claimed by setting locked_until (FOR UPDATE SKIP LOCKED, so replicas share
-- the work); a worker that dies mid-delivery leaves it to be claimed again when the lock
-- expires: deliveries are at least once, and webhooks carry X-Fleetline-Delivery so a
-- receiver can drop a repeat.
CREATE TABLE action_deliveries (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alarm_id         BIGINT NOT NULL REFERENCES rule_alarms (id) ON DELETE CASCADE,
    rule_id          BIGINT NOT NULL,
    event            TEXT NOT NULL CHECK (event IN ('raised', 'cleared')),
    action_index     INTEGER NOT NULL,
    action_type      TEXT NOT NULL CHECK (action_type IN ('webhook', 'pushsafer', 'command')),
    -- The action as it was when the alarm moved, secret included (never served).
    action           JSONB NOT NULL,
    -- What the action sends (the webhook body; the command's device for rate limits).
    payload          JSONB NOT NULL,
    target           TEXT,
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
CREATE INDEX action_deliveries_due_idx ON action_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX action_deliveries_alarm_idx ON action_deliveries (alarm_id, id);
CREATE INDEX action_deliveries_target_idx ON action_deliveries (target, delivered_at)
    WHERE action_type = 'command';

-- Stable SQL surface (PROTOCOL.md).
CREATE VIEW alarms AS
SELECT id, rule_id, device_id, severity, state, raised_at, acknowledged_at, cleared_at,
       value, peak, count, message, rule_name, metric, acknowledged_by, cleared_by
FROM rule_alarms;

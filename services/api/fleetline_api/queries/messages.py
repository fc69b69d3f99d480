"""Cloud-to-device messages over REST (routes/messages.py): queueing, reading, cancelling."""

from __future__ import annotations

from fleetline_api.queries import c2d

# The dispatcher's lock (queries/c2d.py): a device's POSTs and claims take turns.
LOCK_DEVICE = c2d.LOCK_DEVICE

COLUMNS = """
m.id, m.device_id, m.state, m.body::text AS body, m.properties, m.created_at, m.created_by,
m.expires_at, m.sent_at, m.last_sent_at, m.deliveries, m.finished_at, m.seq
"""
SELECT_MESSAGE = f"SELECT {COLUMNS} FROM c2d_messages m WHERE m.id = $1 AND m.device_id = $2"
# $1 device, $2 state (NULL: any), $3 the cursor (a seq), $4 limit + 1.
LIST_MESSAGES = f"""
SELECT {COLUMNS} FROM c2d_messages m
WHERE m.device_id = $1 AND ($2::text IS NULL OR m.state = $2)
  AND ($3::bigint IS NULL OR m.seq < $3)
ORDER BY m.seq DESC
LIMIT $4
"""
# The device's messages not yet final (counted under LOCK_DEVICE).
DEPTH = """
SELECT count(*) FROM c2d_messages
WHERE device_id = $1 AND state IN ('queued', 'sent') AND expires_at > now()
"""
INSERT_MESSAGE = """
INSERT INTO c2d_messages (id, device_id, body, properties, expires_at, created_by)
VALUES ($1, $2, $3::text::jsonb, $4, now() + make_interval(secs => $5), $6)
"""
RECORD_EVENT = (
    "INSERT INTO c2d_message_events (message_id, at, event, detail) VALUES ($1, now(), $2, $3)"
)
CANCEL_MESSAGE = """
UPDATE c2d_messages SET state = 'cancelled', finished_at = now()
WHERE id = $1 AND device_id = $2 AND state IN ('queued', 'sent')
RETURNING id
"""
# The history of the messages $1, each oldest first.
HISTORY = """
SELECT message_id, at, event, detail FROM c2d_message_events
WHERE message_id = ANY($1::uuid[]) ORDER BY at, id
"""

"""Cloud-to-device messages: the dispatcher's claims, marks, expiry and purge
(workers/c2d.py), and the device lock it shares with the POSTs (queries/messages.py)."""

from __future__ import annotations

# FOR NO KEY UPDATE: a device's POSTs and claims take turns, while ingest's FOR KEY SHARE
# (acks, reported twin patches) and foreign-key checks are not held up.
LOCK_DEVICE = "SELECT 1 FROM devices WHERE id = $1 FOR NO KEY UPDATE"

# One device's due messages, leased, under the device's row lock (LOCK_DEVICE first):
# queued ones, and sent ones {resend}; none while another claim's lease on one of them
# is live. Rows another transaction has locked are skipped, never waited for: ingest's
# batch may hold them (an ack is finishing them) and wait for rows a claim holds. The
# UPDATE checks state and lease again. $1 device, $2 max deliveries, $3 the resend
# bound, $4 limit, $5 lease seconds.
_CLAIM = """
WITH due AS (
    SELECT m.id
    FROM c2d_messages m JOIN device_activity a ON a.device_id = m.device_id
    WHERE m.device_id = $1 AND a.online AND m.state IN ('queued', 'sent')
      AND m.expires_at > now() AND m.deliveries < $2
      AND (m.state = 'queued' OR {resend})
      AND NOT EXISTS (
          SELECT 1 FROM c2d_messages o
          WHERE o.device_id = $1 AND o.state IN ('queued', 'sent') AND o.claimed_until > now()
      )
    ORDER BY m.seq
    LIMIT $4
    FOR UPDATE OF m SKIP LOCKED
)
UPDATE c2d_messages m SET claimed_until = now() + make_interval(secs => $5)
FROM due
WHERE m.id = due.id AND m.state IN ('queued', 'sent')
  AND (m.claimed_until IS NULL OR m.claimed_until <= now())
RETURNING m.id, m.device_id, m.seq, m.body::text AS body, m.properties::text AS properties,
          greatest(1, ceil(extract(epoch FROM m.expires_at - now())))::integer AS ttl_left,
          now() AS claimed_at, m.claimed_until
"""
# After the device came online at $3 (the notification's `at`): those last sent before.
CLAIM_FOR_DEVICE = _CLAIM.format(resend="m.last_sent_at < $3::text::timestamptz")
# The sweep: those whose ack is overdue ($3 the ack timeout, seconds).
CLAIM_OVERDUE = _CLAIM.format(resend="m.last_sent_at <= now() - make_interval(secs => $3)")
# Online devices with messages due and no live lease, oldest message first.
DUE_DEVICES = """
SELECT m.device_id
FROM c2d_messages m JOIN device_activity a ON a.device_id = m.device_id
WHERE a.online AND m.state IN ('queued', 'sent')
  AND m.expires_at > now() AND m.deliveries < $1
  AND (m.state = 'queued' OR m.last_sent_at <= now() - make_interval(secs => $2))
  AND NOT EXISTS (
      SELECT 1 FROM c2d_messages o
      WHERE o.device_id = m.device_id AND o.state IN ('queued', 'sent')
        AND o.claimed_until > now()
  )
GROUP BY m.device_id
ORDER BY min(m.seq)
LIMIT $3
"""
# $1 ids, $2 their claims' times, $3 their leases, $4 why sent again. A delivery happened
# at its claim's time, before the publish: a device that came online after it is sent the
# message again (CLAIM_FOR_DEVICE), never the other way round. Only queued and sent
# messages become sent: one acknowledged or cancelled meanwhile keeps its state (the
# delivery is still recorded). The lease ends only if it is still this claim's.
# MARK_SENT skips rows another transaction has locked (so it never waits for ingest's
# batch while holding rows that batch may want); those are marked one by one, waiting,
# with MARK_ONE_SENT. Both return the ids marked.
_MARK = """
WITH claimed AS (
    SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[])
        AS c(id, claimed_at, claimed_until)
), locked AS (
    SELECT m.id FROM c2d_messages m JOIN claimed c ON c.id = m.id
    FOR UPDATE OF m {skip}
), sent AS (
    UPDATE c2d_messages m
    SET state = CASE WHEN m.state IN ('queued', 'sent') THEN 'sent' ELSE m.state END,
        sent_at = coalesce(m.sent_at, c.claimed_at),
        last_sent_at = greatest(m.last_sent_at, c.claimed_at),
        deliveries = m.deliveries + 1,
        claimed_until = CASE WHEN m.claimed_until = c.claimed_until THEN NULL
                             ELSE m.claimed_until END
    FROM claimed c JOIN locked l ON l.id = c.id
    WHERE m.id = c.id
    RETURNING m.id, m.deliveries, c.claimed_at
), events AS (
    INSERT INTO c2d_message_events (message_id, at, event, detail)
    SELECT id, claimed_at, 'sent',
           CASE WHEN deliveries = 1 THEN 'delivery 1'
                ELSE format('delivery %s (%s)', deliveries, $4::text) END
    FROM sent
)
SELECT id FROM sent
"""
MARK_SENT = _MARK.format(skip="SKIP LOCKED")
MARK_ONE_SENT = _MARK.format(skip="")
# Expire the messages ``due`` selects (locked, at most a page), each with its history's
# ``detail``.
_EXPIRE = """
WITH due AS (
{due}
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE c2d_messages m SET state = 'expired', finished_at = now()
    FROM due WHERE m.id = due.id
    RETURNING m.id, m.deliveries
)
INSERT INTO c2d_message_events (message_id, at, event, detail)
SELECT id, now(), 'expired',
{detail}
FROM moved
RETURNING message_id
"""
EXPIRE_TTL = _EXPIRE.format(
    due="""    SELECT id FROM c2d_messages
    WHERE state IN ('queued', 'sent') AND expires_at <= now()
    ORDER BY expires_at
    LIMIT $1""",
    detail="""       CASE WHEN deliveries = 0
            THEN 'its time to live ran out before the device was online to receive it'
            ELSE format('its time to live ran out without an acknowledgement '
                        '(%s deliveries)', deliveries) END""",
)
EXPIRE_EXHAUSTED = _EXPIRE.format(
    due="""    SELECT id FROM c2d_messages
    WHERE state = 'sent' AND deliveries >= $1
      AND last_sent_at <= now() - make_interval(secs => $2)
    ORDER BY last_sent_at
    LIMIT $3""",
    detail="       format('no acknowledgement after %s deliveries (the most allowed)', deliveries)",  # noqa: E501
)
PURGE = """
DELETE FROM c2d_messages
WHERE id IN (
    SELECT id FROM c2d_messages
    WHERE finished_at < now() - make_interval(secs => $1)
    ORDER BY finished_at
    LIMIT $2
)
"""

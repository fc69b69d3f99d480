"""Dead letters (routes/dead_letters.py): device messages ingest could not store."""

from __future__ import annotations

# Newest first: $1 device (NULL: any), $2 the cursor, $3 limit + 1, $4 the bytes of each
# payload returned (its head).
LIST_DEAD_LETTERS = """
SELECT id, received_at, topic, device_id, reason,
       substring(payload FROM 1 FOR $4) AS head, length(payload) AS payload_size
FROM ingest_dead_letter
WHERE ($1::text IS NULL OR device_id = $1) AND ($2::bigint IS NULL OR id < $2)
ORDER BY id DESC
LIMIT $3
"""

"""Message routes (routes/message_routes.py): CRUD and each route's deliveries."""

from __future__ import annotations

COLUMNS = """
id, name, enabled, source, query, metric, condition, destination, version, created_at,
updated_at
"""
# $1 the cursor, $2 limit + 1.
LIST_ROUTES = (
    f"SELECT {COLUMNS} FROM message_routes WHERE ($1::bigint IS NULL OR id > $1) "
    "ORDER BY id LIMIT $2"
)
SELECT_ROUTE = f"SELECT {COLUMNS} FROM message_routes WHERE id = $1"
# Serialises creations, so a count of the routes holds until the transaction ends.
LOCK_ROUTES = "LOCK TABLE message_routes IN SHARE ROW EXCLUSIVE MODE"
COUNT_ROUTES = "SELECT count(*) FROM message_routes"
INSERT_ROUTE = f"""
INSERT INTO message_routes (name, enabled, query, metric, condition, destination, source)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING {COLUMNS}
"""
# The stored destination (its secret), the row locked for the UPDATE that follows.
LOCK_DESTINATION = "SELECT destination FROM message_routes WHERE id = $1 FOR UPDATE"
UPDATE_ROUTE = f"""
UPDATE message_routes SET name = $2, enabled = $3, query = $4, metric = $5, condition = $6,
       destination = $7, source = $8, version = version + 1, updated_at = now()
WHERE id = $1
RETURNING {COLUMNS}
"""
DELETE_ROUTE = "DELETE FROM message_routes WHERE id = $1 RETURNING id"
# A deleted route's deliveries still waiting (the finished ones age out of the log).
DROP_PENDING = "DELETE FROM route_deliveries WHERE route_id = $1 AND status = 'pending'"
ROUTE_EXISTS = "SELECT 1 FROM message_routes WHERE id = $1"
# $1 route, $2 status (NULL: any), $3 the cursor, $4 limit + 1.
DELIVERIES = """
SELECT id, device_id, ts, metrics AS values, status, attempts, next_attempt_at,
       last_error, response_status, created_at, delivered_at
FROM route_deliveries
WHERE route_id = $1 AND ($2::text IS NULL OR status = $2)
  AND ($3::bigint IS NULL OR id < $3)
ORDER BY id DESC
LIMIT $4
"""

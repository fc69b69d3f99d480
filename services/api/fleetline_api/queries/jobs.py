"""Jobs over REST (routes/jobs.py): creating one with its devices' snapshot, reading,
cancelling. The runner's statements are queries/jobs_runner.py."""

from __future__ import annotations

from fleetline import devicequery

# The spec as text: the standard library keeps integers of any size (orjson would not).
COLUMNS = """
id, type, query, spec::text AS spec, batch_size, max_per_second, state, total, counts, error,
created_at, created_by, started_at, cancelled_at, cancelled_by, paused_at, paused_by,
finished_at
"""
SELECT_JOB = f"SELECT {COLUMNS} FROM jobs WHERE id = $1"
# $1 state (NULL: any), $2 the cursor, $3 limit + 1.
LIST_JOBS = f"""
SELECT {COLUMNS} FROM jobs
WHERE ($1::text IS NULL OR state = $1) AND ($2::bigint IS NULL OR id < $2)
ORDER BY id DESC LIMIT $3
"""
INSERT_JOB = """
INSERT INTO jobs (type, query, spec, batch_size, max_per_second, created_by)
VALUES ($1, $2, $3::text::jsonb, $4, $5, $6)
RETURNING id
"""
# $1 job id, $2 the cap + 1, the query's own parameters from $3.
SNAPSHOT = "INSERT INTO job_devices (job_id, device_id) SELECT $1, d.id FROM {from_} WHERE {where}"


def snapshot(where: str) -> str:
    """SNAPSHOT for a compiled query's condition, at most $2 devices."""
    statement = SNAPSHOT.format(from_=devicequery.DEVICE_FROM, where=where)
    return f"{statement} LIMIT $2"


SET_TOTAL = "UPDATE jobs SET total = $2 WHERE id = $1"
# A rollout's waves: the first $2 devices (in an order of the job's own, not by id) are
# the canary, wave 0; then waves of $3.
SET_WAVES = """
UPDATE job_devices jd
SET wave = CASE WHEN o.n <= $2 THEN 0 ELSE 1 + (o.n - $2 - 1) / $3 END
FROM (SELECT device_id, row_number() OVER (ORDER BY md5(device_id || '/' || job_id)) AS n
      FROM job_devices WHERE job_id = $1) o
WHERE jd.job_id = $1 AND jd.device_id = o.device_id
"""
# The release a rollout puts on its devices: released, or nothing.
RELEASED_FIRMWARE = """
SELECT f.id, f.version, f.kind, b.size, f.manifest, f.signature
FROM firmware f JOIN blobs b ON b.id = f.blob_id
WHERE f.id = $1 AND f.manifest IS NOT NULL
FOR SHARE OF f
"""
FIRMWARE_EXISTS = "SELECT 1 FROM firmware WHERE id = $1"
SET_SPEC = "UPDATE jobs SET spec = $2::text::jsonb WHERE id = $1"
# Devices of the new rollout $1 that another rollout not finished has yet to start or
# finish (one device cannot take two releases at once), and the first such rollout.
BUSY_IN_ROLLOUT = """
SELECT count(DISTINCT o.device_id)::int AS devices, min(o.job_id) AS rollout
FROM job_devices n
JOIN job_devices o ON o.device_id = n.device_id AND o.job_id <> n.job_id
    AND o.state IN ('pending', 'running')
JOIN jobs j ON j.id = o.job_id AND j.type = 'rollout'
WHERE n.job_id = $1
HAVING count(*) > 0
"""
# Updating devices of the rollouts $1 per phase.
PHASE_COUNTS = """
SELECT job_id, phase, count(*)::int AS n FROM job_devices
WHERE job_id = ANY($1::bigint[]) AND state = 'running' AND phase IS NOT NULL
GROUP BY job_id, phase
"""
# Devices per state of the jobs $1 not finished yet (a finished job stores its counts).
LIVE_COUNTS = """
SELECT job_id, state, count(*)::int AS n FROM job_devices
WHERE job_id = ANY($1::bigint[]) GROUP BY job_id, state
"""
JOB_EXISTS = "SELECT 1 FROM jobs WHERE id = $1"
DEVICE_COLUMNS = """
device_id, state, attempts, status, reason, result, error, started_at, finished_at, wave, phase,
phase_at, progress, refused_reports, refused_report
"""
# $1 job, $2 state (NULL: any), $3 the cursor (a device id), $4 limit + 1.
LIST_DEVICES = f"""
SELECT {DEVICE_COLUMNS} FROM job_devices
WHERE job_id = $1 AND ($2::text IS NULL OR state = $2)
  AND ($3::text IS NULL OR device_id > $3)
ORDER BY device_id LIMIT $4
"""
# No row when the job is not queued, running or paused.
CANCEL_JOB = """
UPDATE jobs SET state = 'cancelled', cancelled_at = now(), cancelled_by = $2
WHERE id = $1 AND state IN ('queued', 'running', 'paused')
RETURNING id
"""
# No row when the job is not queued or running.
PAUSE_JOB = """
UPDATE jobs SET state = 'paused', paused_at = now(), paused_by = $2
WHERE id = $1 AND state IN ('queued', 'running')
RETURNING id
"""
# Back to running (queued if nothing started yet); a rollout's failure threshold counts
# from here. No row when the job is not paused.
RESUME_JOB = """
UPDATE jobs j
SET state = CASE WHEN j.started_at IS NULL THEN 'queued' ELSE 'running' END,
    paused_at = NULL, paused_by = NULL, error = NULL, next_batch_at = now(),
    failed_before_resume = c.failed, finished_before_resume = c.finished
FROM (SELECT count(*) FILTER (WHERE state IN ('failed', 'rolled_back'))::int AS failed,
             count(*) FILTER (WHERE state IN ('succeeded', 'failed', 'rolled_back'))::int
                 AS finished
      FROM job_devices WHERE job_id = $1) c
WHERE j.id = $1 AND j.state = 'paused'
RETURNING j.id
"""
JOB_STATE = "SELECT state FROM jobs WHERE id = $1"

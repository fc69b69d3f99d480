"""The job runner's statements (workers/jobs/): claiming job devices, recording their
outcomes, handing them back, finishing jobs, and the sweep's expiry and retention."""

from __future__ import annotations

# The first wave of job $1 with a device left to start or finish: only its devices start.
OPEN_WAVE = """
(SELECT min(o.wave) FROM job_devices o WHERE o.job_id = {job} AND o.state IN ('pending', 'running'))
"""
# $1: whether this process may start twin devices now (a rollout's notification is one).
PICK_JOB = f"""
SELECT j.id, j.type, j.spec::text AS spec, j.batch_size, j.max_per_second, j.state
FROM jobs j
WHERE j.state IN ('queued', 'running') AND j.next_batch_at <= now()
  AND ($1::boolean OR j.type NOT IN ('twin', 'rollout'))
  AND EXISTS (SELECT 1 FROM job_devices p WHERE p.job_id = j.id AND p.state = 'pending'
              AND p.wave = {OPEN_WAVE.format(job="j.id")})
  AND (SELECT count(*) FROM job_devices r WHERE r.job_id = j.id AND r.state = 'running')
      < j.batch_size
ORDER BY j.next_batch_at, j.id
LIMIT 1
FOR UPDATE OF j SKIP LOCKED
"""
COUNT_RUNNING = "SELECT count(*) FROM job_devices WHERE job_id = $1 AND state = 'running'"
# Up to $2 pending devices of job $1's open wave start: running, leased for $3 seconds by
# runner $4.
CLAIM = f"""
UPDATE job_devices jd
SET state = 'running', attempts = jd.attempts + 1, started_at = now(), finished_at = NULL,
    lease_until = now() + make_interval(secs => $3), claimed_by = $4
FROM (SELECT device_id FROM job_devices
      WHERE job_id = $1 AND state = 'pending' AND wave = {OPEN_WAVE.format(job="$1")}
      ORDER BY device_id LIMIT $2) p
WHERE jd.job_id = $1 AND jd.device_id = p.device_id
RETURNING jd.device_id, jd.attempts
"""
# A rollout outside its time window: not picked again before $2.
WAIT_UNTIL = "UPDATE jobs SET next_batch_at = $2 WHERE id = $1"
# $2 devices just started: the next start of this job waits $2 / max_per_second, the
# rate taken as 0.001 at least (the API's minimum): a rate stored before there was one,
# small enough to overflow the division, made the runner fail at every poll.
ADVANCE = """
UPDATE jobs SET state = 'running', started_at = coalesce(started_at, now()),
    next_batch_at = CASE WHEN max_per_second IS NULL THEN now()
                         ELSE now() + make_interval(secs => $2 / greatest(max_per_second, 0.001))
                    END
WHERE id = $1
"""
# The start still holds the device: its lease renewed from now.
CONFIRM = """
UPDATE job_devices SET lease_until = now() + make_interval(secs => $4)
WHERE job_id = $1 AND device_id = $2 AND state = 'running' AND attempts = $3
"""
# A device's outcome, written only by the start that holds it ($3: its attempt).
RECORD = """
UPDATE job_devices
SET state = $4, status = $5, reason = $6, result = $7::text::jsonb, error = $8,
    finished_at = now(), lease_until = NULL
WHERE job_id = $1 AND device_id = $2 AND state = 'running' AND attempts = $3
"""
# A rollout device notified by the start that holds it ($3: its attempt): from now on its
# reports drive it (workers/jobs/rollouts.py), not a lease.
NOTIFIED = """
UPDATE job_devices
SET phase = 'notified', phase_at = now(), progress = NULL, status = $4, reason = $5,
    result = $6::text::jsonb, error = $7, lease_until = NULL
WHERE job_id = $1 AND device_id = $2 AND state = 'running' AND attempts = $3
  AND phase IS NULL
"""
# Back to pending (cancelled, if the job was cancelled meanwhile) without an outcome;
# $4: take the start back (nothing was sent) or not.
RELEASE = """
UPDATE job_devices jd
SET state = CASE WHEN j.state = 'cancelled' THEN 'cancelled' ELSE 'pending' END,
    reason = CASE WHEN j.state = 'cancelled' THEN 'cancelled' END,
    finished_at = CASE WHEN j.state = 'cancelled' THEN now() END,
    attempts = jd.attempts - $4, lease_until = NULL, started_at = NULL
FROM jobs j, unnest($2::text[], $3::int[]) AS u(device_id, attempts)
WHERE j.id = $1 AND jd.job_id = $1 AND jd.device_id = u.device_id
  AND jd.attempts = u.attempts AND jd.state = 'running'
"""
# Method devices cut short at shutdown after their request was sent.
INTERRUPT = """
UPDATE job_devices jd
SET state = 'failed', status = 503, reason = 'interrupted', error = $4, result = NULL,
    finished_at = now(), lease_until = NULL
FROM unnest($2::text[], $3::int[]) AS u(device_id, attempts)
WHERE jd.job_id = $1 AND jd.device_id = u.device_id AND jd.attempts = u.attempts
  AND jd.state = 'running'
"""
# Devices whose lease ran out: pending again, or failed as abandoned after $1 starts
# (cancelled, if their job was).
EXPIRE = """
UPDATE job_devices jd
SET state = CASE WHEN j.state = 'cancelled' THEN 'cancelled'
                 WHEN jd.attempts >= $1 THEN 'failed' ELSE 'pending' END,
    reason = CASE WHEN j.state = 'cancelled' THEN 'cancelled'
                  WHEN jd.attempts >= $1 THEN 'abandoned' END,
    error = CASE WHEN j.state <> 'cancelled' AND jd.attempts >= $1
                 THEN format('started %s times; each time its runner stopped before an '
                             'outcome was recorded', jd.attempts) END,
    finished_at = CASE WHEN j.state = 'cancelled' OR jd.attempts >= $1 THEN now() END,
    lease_until = NULL
FROM jobs j
WHERE jd.state = 'running' AND jd.lease_until < now() AND j.id = jd.job_id
RETURNING jd.job_id, jd.device_id, jd.state, jd.claimed_by
"""
# Pending devices of a job that was just cancelled.
CANCEL_PENDING = """
UPDATE job_devices SET state = 'cancelled', reason = 'cancelled', finished_at = now()
WHERE job_id = $1 AND state = 'pending'
"""
# Pending devices of cancelled jobs: a device handed back while its job was being
# cancelled (RELEASE read the job before the cancel committed).
CANCEL_LEFTOVERS = """
UPDATE job_devices jd SET state = 'cancelled', reason = 'cancelled', finished_at = now()
FROM jobs j
WHERE j.finished_at IS NULL AND j.state = 'cancelled' AND jd.job_id = j.id
  AND jd.state = 'pending'
"""
# A job with no device pending or running is finished (a paused one too: nothing is left
# to resume; a rollout stopped at its threshold ends failed once its updating devices
# are done); $1: that job only (NULL: all).
FINISH = """
UPDATE jobs j
SET state = CASE WHEN j.state = 'paused' AND j.paused_by = 'failure threshold' THEN 'failed'
                 WHEN j.state IN ('queued', 'running', 'paused') THEN 'completed'
                 ELSE j.state END,
    finished_at = now(),
    counts = (SELECT coalesce(jsonb_object_agg(s.state, s.n), '{}'::jsonb)
              FROM (SELECT state, count(*) AS n FROM job_devices
                    WHERE job_id = j.id GROUP BY state) s)
WHERE j.finished_at IS NULL AND j.state IN ('queued', 'running', 'paused', 'cancelled', 'failed')
  AND ($1::bigint IS NULL OR j.id = $1)
  AND NOT EXISTS (SELECT 1 FROM job_devices x
                  WHERE x.job_id = j.id AND x.state IN ('pending', 'running'))
RETURNING j.id, j.type, j.state, j.total, j.counts, j.created_at, j.started_at,
          j.finished_at
"""
# A job whose spec cannot run: failed ($2 why), its pending devices cancelled.
FAIL_JOB = """
WITH failed AS (
    UPDATE jobs SET state = 'failed', error = $2, finished_at = now(),
        counts = jsonb_build_object('cancelled', total)
    WHERE id = $1 AND state IN ('queued', 'running')
    RETURNING id
)
UPDATE job_devices SET state = 'cancelled', reason = 'cancelled', finished_at = now()
WHERE job_id IN (SELECT id FROM failed) AND state = 'pending'
"""
# Finished jobs past their retention ($1 days), at most $2 at a time.
EXPIRED_JOBS = """
DELETE FROM jobs WHERE id IN (
    SELECT id FROM jobs WHERE finished_at < now() - make_interval(days => $1)
    ORDER BY finished_at LIMIT $2
)
"""

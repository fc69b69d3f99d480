"""The rollouts' sweep (workers/jobs/rollouts.py): reading what devices being updated
reported, recording their steps, and stopping a rollout at its failure threshold."""

from __future__ import annotations

# Devices being updated whose twin changed since last read, or whose phase ran past its
# timeout, locked (other replicas skip them).
REPORTS = """
SELECT jd.job_id, jd.device_id, jd.phase, jd.progress,
       extract(epoch FROM now() - jd.phase_at)::float8 AS in_phase_s,
       j.spec -> 'timeouts' AS timeouts, j.spec ->> 'version' AS version,
       tr.version AS twin_version, tr.reported -> 'firmware' AS report
FROM job_devices jd
JOIN jobs j ON j.id = jd.job_id
LEFT JOIN twin_reported tr ON tr.device_id = jd.device_id AND tr.module_id = ''
WHERE jd.state = 'running' AND jd.phase IS NOT NULL AND j.type = 'rollout'
  AND (tr.version > jd.report_version
       OR jd.phase_at + make_interval(secs => (j.spec -> 'timeouts' ->> jd.phase)::float8)
          < now())
ORDER BY jd.job_id, jd.device_id
FOR UPDATE OF jd SKIP LOCKED
"""
# $3 phase, $4 progress, $5 state (running or final), $6 reason, $7 error, $8 the twin's
# version read, $9 why the report was refused (NULL: it was not).
STEP = """
UPDATE job_devices
SET phase = $3, progress = $4,
    phase_at = CASE WHEN phase IS DISTINCT FROM $3 THEN now() ELSE phase_at END,
    state = $5, reason = coalesce($6, reason), error = coalesce($7, error),
    finished_at = CASE WHEN $5 <> 'running' THEN now() END,
    report_version = greatest(report_version, $8),
    refused_reports = refused_reports + CASE WHEN $9::text IS NULL THEN 0 ELSE 1 END,
    refused_report = coalesce($9, refused_report)
WHERE job_id = $1 AND device_id = $2 AND state = 'running'
"""
LOCK_RUNNING_ROLLOUT = """
SELECT (spec ->> 'canary')::int AS canary,
       (spec ->> 'failure_threshold_percent')::float8 AS threshold,
       spec ->> 'on_failure' AS on_failure, failed_before_resume, finished_before_resume
FROM jobs WHERE id = $1 AND type = 'rollout' AND state IN ('queued', 'running')
FOR UPDATE
"""
FINISHED = """
SELECT count(*) FILTER (WHERE state IN ('failed', 'rolled_back'))::int AS failed,
       count(*) FILTER (WHERE state IN ('succeeded', 'failed', 'rolled_back'))::int AS finished
FROM job_devices WHERE job_id = $1
"""
PAUSE_AT_THRESHOLD = """
UPDATE jobs SET state = 'paused', paused_at = now(), paused_by = $3, error = $2 WHERE id = $1
"""
ABORT = "UPDATE jobs SET state = 'failed', error = $2 WHERE id = $1"

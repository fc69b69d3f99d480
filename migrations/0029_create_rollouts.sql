-- Firmware rollouts (docs/ota.md): a job of type `rollout` puts a firmware release on
-- every device a query matched, in waves, at most `batch_size` devices updating at once.
--
-- A rollout reuses the job machinery of migration 0016: the devices are snapshotted
-- into `job_devices`; a runner claims a pending device with a lease and notifies it (a
-- desired-properties patch naming the release), exactly as it applies a twin job; the
-- lease then gives way to the device's own reports: from `notified` on, the device's
-- `phase` follows what it reports in its twin (downloading with progress, verifying,
-- applying, rebooting), each phase bounded by a timeout, until it ends succeeded, failed
-- or rolled_back. Any job may now be paused (no device is started while paused; those
-- running go on) and resumed.

ALTER TABLE jobs DROP CONSTRAINT jobs_type_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_type_check CHECK (type IN ('method', 'twin', 'rollout'));
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('queued', 'running', 'paused', 'completed', 'cancelled', 'failed'));
ALTER TABLE jobs
    ADD COLUMN paused_at TIMESTAMPTZ,
    ADD COLUMN paused_by TEXT,
    -- A rollout's failure threshold counts the devices finished since it was last
    -- resumed: the failed and finished counts at that moment.
    ADD COLUMN failed_before_resume INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN finished_before_resume INTEGER NOT NULL DEFAULT 0;

ALTER TABLE job_devices DROP CONSTRAINT job_devices_state_check;
ALTER TABLE job_devices ADD CONSTRAINT job_devices_state_check
    CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'rolled_back', 'cancelled'));
ALTER TABLE job_devices
    -- Waves start in order: no device of wave n + 1 starts before every device of the
    -- waves up to n has finished (0 for every device of a method or twin job).
    ADD COLUMN wave INTEGER NOT NULL DEFAULT 0 CHECK (wave >= 0),
    -- A rollout device from its notification on: notified, downloading, verifying,
    -- applying, rebooting, then its final state; since `phase_at`.
    ADD COLUMN phase TEXT CHECK (phase IN ('notified', 'downloading', 'verifying', 'applying',
                                           'rebooting', 'succeeded', 'failed', 'rolled_back')),
    ADD COLUMN phase_at TIMESTAMPTZ,
    -- Downloading: percent of the image received, as the device reported it.
    ADD COLUMN progress SMALLINT CHECK (progress BETWEEN 0 AND 100),
    -- The version of the device's reported properties last read for this rollout.
    ADD COLUMN report_version BIGINT NOT NULL DEFAULT 0,
    -- Reports that could not be taken (an unknown state, a step back): how many, the last.
    ADD COLUMN refused_reports INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN refused_report TEXT;

-- The first wave with a device left to start or finish, per job; the rollouts' sweep of
-- the devices waiting on their reports.
CREATE INDEX job_devices_open ON job_devices (job_id, wave) WHERE state IN ('pending', 'running');
CREATE INDEX job_devices_reporting ON job_devices (job_id)
    WHERE state = 'running' AND phase IS NOT NULL;

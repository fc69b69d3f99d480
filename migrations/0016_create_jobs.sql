-- Jobs (/v1/jobs): a direct method or a desired-properties patch run on every device a
-- device query matched when the job was created.
--
-- One writer, the api service: the route creates and cancels jobs, and the job runner
-- of every API replica claims devices, records their outcomes and finishes jobs. The
-- devices a job targets are snapshotted into `job_devices` in the transaction that
-- creates the job, so the target set never changes and each device ends with exactly
-- one final state.
--
-- Claiming: a runner locks one runnable job row (`FOR UPDATE SKIP LOCKED`), moves up to
-- its free slots of pending devices to running with a lease, and commits. A device whose
-- lease ran out (its API process died) goes back to pending, or to failed after the
-- maximum of attempts; that is how a job survives an API restart.

CREATE TABLE jobs (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type            TEXT NOT NULL CHECK (type IN ('method', 'twin')),
    query           TEXT NOT NULL,
    -- method: {"name", "params", "timeout_s"}; twin: {"patch"}.
    spec            JSONB NOT NULL CHECK (jsonb_typeof(spec) = 'object'),
    -- At most this many of the job's devices run at once (over all replicas).
    batch_size      INTEGER NOT NULL CHECK (batch_size BETWEEN 1 AND 1000),
    -- Devices started per second; NULL: as fast as batch_size allows.
    max_per_second  DOUBLE PRECISION CHECK (max_per_second > 0),
    state           TEXT NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'running', 'completed', 'cancelled', 'failed')),
    total           INTEGER NOT NULL DEFAULT 0,
    -- Devices per final state, written when the job finishes (live counts before).
    counts          JSONB,
    error           TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_by      TEXT,
    started_at      TIMESTAMPTZ,
    cancelled_at    TIMESTAMPTZ,
    cancelled_by    TEXT,
    -- Set once no device is pending or running (a cancelled job: once the devices that
    -- were running have finished).
    finished_at     TIMESTAMPTZ,
    -- The rate limit: no device of this job is started before then.
    next_batch_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The runners' poll: jobs that may have devices to start.
CREATE INDEX jobs_runnable ON jobs (next_batch_at, id) WHERE state IN ('queued', 'running');
-- Jobs waiting to be finished (running, or cancelled with devices still running).
CREATE INDEX jobs_unfinished ON jobs (id) WHERE finished_at IS NULL;
CREATE INDEX jobs_state ON jobs (state, id);
-- Retention: finished jobs older than FLEETLINE_API_JOBS_RETENTION_DAYS are deleted.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- No foreign key to devices: a device deleted after the job was created keeps its row
-- here (its outcome is "not found").
CREATE TABLE job_devices (
    job_id       BIGINT NOT NULL REFERENCES jobs ON DELETE CASCADE,
    device_id    TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    -- Times the device was started (a lease that ran out counts).
    attempts     INTEGER NOT NULL DEFAULT 0,
    lease_until  TIMESTAMPTZ,
    -- The runner (API process) that started it last.
    claimed_by   TEXT,
    -- The device's own status for an answered method, else an HTTP-like status of the
    -- outcome (409 offline, 504 no answer...); `reason` says it in a word.
    status       INTEGER,
    reason       TEXT,
    result       JSONB,
    error        TEXT,
    started_at   TIMESTAMPTZ,
    finished_at  TIMESTAMPTZ,
    PRIMARY KEY (job_id, device_id)
);

-- Claiming pending devices in id order, counting devices per state, and listing a
-- job's devices by state with cursor paging.
CREATE INDEX job_devices_state ON job_devices (job_id, state, device_id);
-- Leases that ran out, over all jobs.
CREATE INDEX job_devices_leases ON job_devices (lease_until) WHERE state = 'running';

"""The job runner: every API replica runs one, and together they carry out ``/v1/jobs``.

A job's devices were snapshotted into ``job_devices`` when it was created
(routes/jobs.py). The runner loops: it locks one runnable job row with
``FOR UPDATE SKIP LOCKED`` (runnable: queued or running, ``next_batch_at`` reached, a
pending device, fewer running devices than its ``batch_size``), moves up to its free
slots of pending devices to ``running`` with a lease (the device's own timeout plus
``FLEETLINE_API_JOBS_LEASE_GRACE_SECONDS``), pushes ``next_batch_at`` out by the rate
limit, and commits; then it runs those devices concurrently through the same code as
the REST routes (fleetline_api/commands.py) and writes each outcome. Claims of one job
serialise on its row, so ``batch_size`` bounds the job's running devices over all
replicas, and replicas share a job's devices without running one twice.

A process claims no more devices than it starts at once: every claimed device runs at
once, and twin devices (each holds a database connection through its transaction and
the retained publish) at most one fewer than the runner's connections, so none waits
behind the others for a connection while its lease runs. Just before a method request
is published, and first thing in the transaction applying a twin patch, the device's
start confirms that it still holds the device (``running``, ``attempts`` unchanged) and
renews the lease, unless its claim is too recent for the lease to have run out; a start
that lost it sends and changes nothing.

Surviving a restart: a device whose lease ran out (its API process died, or lost the
database for that long) goes back to pending and is started again, by any replica;
after ``FLEETLINE_API_JOBS_MAX_ATTEMPTS`` starts it fails as ``abandoned``. An outcome is
written only by the start that holds the device (``attempts`` matches), so each device
ends in exactly one final state. A method whose process died mid-call may therefore
reach the device twice (at least once). On SIGTERM the runner stops claiming and lets
running devices finish (each call ends at its own timeout) for up to
SHUTDOWN_GRACE_SECONDS; a method cut short then ends ``failed`` (``interrupted``) once
its request was sent, so a planned restart never sends a method twice; anything else
cut short goes back to pending.

A job is finished (``completed``, or ``cancelled`` once its running devices are done)
by whoever records its last outcome, or by the sweep each runner makes every
``jobs_sweep_interval_seconds`` (a second), which also takes back expired leases and
follows rollout devices (rollouts.py); finished jobs past their retention are deleted.

The package: ``runner.py`` claims and runs the devices (:class:`JobRunner`),
``outcomes.py`` records outcomes and finishes jobs (with the metrics they count),
``handback.py`` is the shutdown; the SQL is queries/jobs_runner.py.
"""

from __future__ import annotations

from fleetline_api.workers.jobs.handback import HANDBACK_SECONDS, SHUTDOWN_GRACE_SECONDS
from fleetline_api.workers.jobs.outcomes import JOB_DEVICES, JOBS, cancel_pending, finish
from fleetline_api.workers.jobs.runner import IN_FLIGHT, JobRunner

__all__ = [
    "HANDBACK_SECONDS",
    "IN_FLIGHT",
    "JOBS",
    "JOB_DEVICES",
    "SHUTDOWN_GRACE_SECONDS",
    "JobRunner",
    "cancel_pending",
    "finish",
]

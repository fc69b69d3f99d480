"""Prometheus metrics of the ingest service (counted per batch, not per message)."""

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter(
    "fleetline_ingest_messages_total", "MQTT messages written and acknowledged", ["kind"]
)
ROWS = Counter("fleetline_ingest_rows_total", "Telemetry values stored")
DUPLICATES = Counter(
    "fleetline_ingest_duplicate_rows_total", "Values already stored (redelivered or re-sent)"
)
DUPLICATE_BATCHES = Counter(
    "fleetline_ingest_duplicate_batches_total",
    "Batches that held an already stored value and went through the staging table",
)
TWIN_PATCHES = Counter(
    "fleetline_ingest_twin_patches_total", "Reported twin patches applied to their twins"
)
C2D_ACKS = Counter(
    "fleetline_ingest_c2d_acks_total",
    "Device acknowledgements of cloud-to-device messages applied (or ignored as repeats)",
)
DEAD_LETTERS = Counter("fleetline_ingest_dead_letters_total", "Messages dead-lettered")
BATCHES = Counter("fleetline_ingest_batches_total", "Batches committed")
BATCH_SECONDS = Histogram(
    "fleetline_ingest_batch_seconds",
    "Time to write and commit one batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_ROWS = Histogram(
    "fleetline_ingest_batch_rows",
    "Values per committed batch",
    buckets=(1, 10, 100, 500, 1000, 5000, 10000, 50000, 200000),
)
WRITE_ERRORS = Counter(
    "fleetline_ingest_write_errors_total", "Failed batch writes (retried)", ["kind"]
)
PENDING_MESSAGES = Gauge(
    "fleetline_ingest_pending_messages",
    "Messages received and held in memory, not yet written (and acknowledged)",
)
PAUSED = Gauge(
    "fleetline_ingest_paused", "1 while reading from the broker is paused (backpressure)"
)
CONNECTED = Gauge("fleetline_ingest_mqtt_connected", "1 while connected to the broker")
BROKER_DROPPED = Gauge(
    "fleetline_broker_dropped_messages",
    "Messages the broker dropped since it started, for lack of queue space "
    "(max_queued_messages) in any session; a rise while ingest is behind means lost readings",
)
BROKER_DROPS_SEEN = Counter(
    "fleetline_ingest_broker_drops_seen_total",
    "Messages the broker dropped for lack of queue space while this ingest process watched "
    "(rises of its count; what it dropped before is in fleetline_broker_dropped_messages)",
)
BROKER_STORED = Gauge(
    "fleetline_broker_stored_messages",
    "Messages the broker holds (queued for sessions, in flight, retained)",
)
STREAM_MESSAGES = Counter(
    "fleetline_ingest_stream_messages_total",
    "Messages of stored events published for /v1/stream (only while an API process has "
    "stream clients), by outcome: published, dropped (the broker link was down or behind)",
    ["outcome"],
)
for _outcome in ("published", "dropped"):
    STREAM_MESSAGES.labels(_outcome)
STREAM_LISTENERS = Gauge(
    "fleetline_ingest_stream_listeners", "API processes with stream clients, as ingest knows them"
)

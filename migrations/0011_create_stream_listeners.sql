-- Who is listening to the live stream (fleetline/streamevents.py).
--
-- Announcing every stored reading over NOTIFY costs ingest about half its batched
-- throughput (bench/ingest.py), which is waste when no one watches. An API process with
-- /v1/stream clients keeps a row here, refreshed before it expires; ingest announces
-- batches only while an unexpired row exists. Written by the api service, read by ingest.
-- UNLOGGED: presence is soft state, lost harmlessly in a crash.
CREATE UNLOGGED TABLE stream_listeners (
    listener_id  TEXT PRIMARY KEY,
    expires_at   TIMESTAMPTZ NOT NULL
);

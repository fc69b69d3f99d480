-- The live stream's readings and status changes travel over the broker now: ingest
-- publishes them after commit while an API process keeps a retained presence message
-- (fleetline/streamevents.py), so the presence table 0011 made is no longer read or
-- written. An ingest of an earlier release still running during an upgrade logs a
-- warning each second until it is replaced, and stores its batches as before.
DROP TABLE IF EXISTS stream_listeners;

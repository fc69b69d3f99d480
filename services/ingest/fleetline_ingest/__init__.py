"""fleetline ingest service."""

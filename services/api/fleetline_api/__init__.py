"""fleetline api service."""

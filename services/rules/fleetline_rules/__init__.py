"""fleetline rules service."""

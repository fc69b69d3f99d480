"""Development and demo tooling: local PostgreSQL and Mosquitto servers (``embedded``),
the simulated fleet (``simulator``) and ``fleetline up`` (``up``). Not used by the services."""

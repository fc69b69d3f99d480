"""fleetline: the common package shared by the services (config, database, MQTT, protocol)."""

__version__ = "0.1.0"

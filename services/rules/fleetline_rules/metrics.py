"""Prometheus metrics of the rules service (served on /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

MESSAGES = Counter(
    "fleetline_rules_messages_total", "MQTT messages received by the rules service", ["kind"]
)
EVALUATIONS = Counter(
    "fleetline_rules_evaluations_total", "Readings evaluated against a rule (rule x value)"
)
TRANSITIONS = Counter(
    "fleetline_rules_transitions_total", "Rule state transitions written", ["event"]
)
ACTIONS = Counter("fleetline_rules_actions_total", "Action delivery attempts", ["type", "result"])
RULES = Gauge("fleetline_rules_loaded", "Enabled rules loaded")
CONNECTED = Gauge("fleetline_rules_mqtt_connected", "1 while connected to the broker")
PENDING_MESSAGES = Gauge(
    "fleetline_rules_pending_messages", "Messages received and not yet evaluated"
)

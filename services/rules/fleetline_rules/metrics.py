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
    "fleetline_rules_pending_messages",
    "Messages received and held in memory, not yet evaluated (and acknowledged)",
)
PAUSED = Gauge("fleetline_rules_paused", "1 while reading from the broker is paused (backpressure)")
ROUTES = Gauge("fleetline_rules_routes_loaded", "Enabled message routes loaded")
ROUTED_DEVICES = Gauge(
    "fleetline_rules_routed_devices", "Registered devices at least one message route takes"
)
ROUTED = Counter(
    "fleetline_rules_routed_total", "Readings queued for a message route (one per route)"
)
ROUTE_DELIVERIES = Counter(
    "fleetline_rules_route_deliveries_total",
    "Message route delivery attempts",
    ["type", "result"],
)
ROUTE_PENDING = Gauge(
    "fleetline_rules_route_deliveries_pending", "Route deliveries waiting (at the last cleanup)"
)
WRITE_ERRORS = Counter(
    "fleetline_rules_write_errors_total",
    "Failed writes of a batch's transitions and route deliveries, by what was done: "
    "notify_queue_full (written again without notifications), retried (not acknowledged, "
    "retried with backoff), isolated (written item by item), dropped (an item the "
    "database refuses, logged with the reason)",
    ["reason"],
)

"""What operators read: JSON-line logs with redaction (`logs`) and Prometheus
metrics, including publish-to-deliver latency (`metrics`: the LatencyTracker)."""

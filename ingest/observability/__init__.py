"""Observability: metrics, health endpoints, JSON logs, librdkafka log routing."""

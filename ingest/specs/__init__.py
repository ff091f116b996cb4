"""Desired subscriptions (specs) as a compacted Kafka topic: the work that scaled-out workers share."""

"""ingest: RingCentral push notifications (over PubNub) into Kafka topics keyed by account."""

__version__ = "0.1.0"

"""Local stand-ins for the outside world: a real Kafka broker, and emulators of RingCentral and PubNub."""

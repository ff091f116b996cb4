"""Transports: the intake side of the data plane (PubNub, WebSocket, WebHook)."""

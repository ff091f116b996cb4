"""RingCentral control-plane client: HTTP, OAuth tokens, subscription lifecycle."""

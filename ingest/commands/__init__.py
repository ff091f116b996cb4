"""Commands of the `ingest` CLI besides `run` and `sandbox`: status, tail, demo, apply."""

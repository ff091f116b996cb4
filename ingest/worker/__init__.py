"""The worker process: `ingest run`."""

"""Benchmarks: runnable modules (`python -m ingest.bench.<name>`) that print JSON results."""

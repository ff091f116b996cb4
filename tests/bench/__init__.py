"""Benchmarks: runnable modules (`python -m tests.bench.<name>`) that print JSON results."""

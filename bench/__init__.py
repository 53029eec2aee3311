"""Benchmark suite for ocrproxy's latency-critical path: ``python -m bench`` (see README.md)."""

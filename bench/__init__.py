"""Benchmarks and the reliability harness (``make bench``; the short forms run in the tests)."""

"""Benchmarks: speed ratios measured in one run (``make bench``)."""

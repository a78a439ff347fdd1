"""Benchmarks runnable as ``medagent bench ...``: they print medians and ratios, last line JSON."""

"""Triggered summaries: durable jobs, the queues that deliver them, and the worker that runs them."""

"""Shared test fixtures. Server fixtures live in tests/support and are loaded as plugins."""

pytest_plugins = ["tests.support.plugin_servers"]

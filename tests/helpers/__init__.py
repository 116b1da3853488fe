"""Reusable pieces of the test suite: processes, backends, traffic, loops, relays, TLS and
federation fixtures (import them; fixtures live in conftest.py files)."""

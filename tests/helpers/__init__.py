"""Shared test helpers (import them; fixtures live in conftest.py files)."""
